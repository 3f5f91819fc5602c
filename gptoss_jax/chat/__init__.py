"""The harmony chat format: ``tokenizer`` (offline o200k_harmony), ``encoding`` (openai-harmony's
encoding, special-token ids), ``messages`` (the message model), ``render`` (conversations ->
tokens), ``parse`` (generated tokens -> replies and stream events). ``gptoss_jax.harmony`` is the
public facade over the last four."""

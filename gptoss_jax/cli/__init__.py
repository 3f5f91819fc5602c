"""The command lines, thin ``main()``s over the library: ``generate``, ``serve``, ``finetune``,
``convert``, each over ``common`` (one-line errors and exit status 2, the model and multi-host
flags, model loading). ``python -m gptoss_jax.generate`` (``.serve``, ``.finetune``,
``.convert``) runs them through shims."""

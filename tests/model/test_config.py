"""GptOssConfig from the three real config.json spellings, defaults, and errors that name the file.

The dicts below are the released files as they are on the hub (openai/gpt-oss-20b and -120b
``config.json`` and ``original/config.json``), written out literally.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from gptoss_jax.model.config import (
    FULL,
    GPT_OSS_20B,
    GPT_OSS_120B,
    PRESETS,
    SLIDING,
    ConfigError,
    GptOssConfig,
)


def _layer_types(n):
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


HF_20B = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": _layer_types(24),
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}
HF_120B = {**HF_20B, "num_hidden_layers": 36, "num_local_experts": 128,
           "layer_types": _layer_types(36)}

# Newer transformers (5.x) writes the rope dict as rope_parameters, rope_theta inside it.
HF_20B_ROPE_PARAMETERS = {k: v for k, v in HF_20B.items() if k not in ("rope_scaling", "rope_theta")}
HF_20B_ROPE_PARAMETERS["rope_parameters"] = {
    "beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
    "rope_theta": 150000.0, "rope_type": "yarn", "truncate": False,
}

ORIGINAL_20B = {
    "num_hidden_layers": 24,
    "num_experts": 32,
    "experts_per_token": 4,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "swiglu_limit": 7.0,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "initial_context_length": 4096,
    "rope_theta": 150000,
    "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1,
    "rope_ntk_beta": 32,
}
ORIGINAL_120B = {**ORIGINAL_20B, "num_hidden_layers": 36, "num_experts": 128}


def _write(tmp_path, raw, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(raw, indent=2) if isinstance(raw, dict) else raw)
    return path


@pytest.mark.parametrize("raw, expected", [
    (HF_20B, GPT_OSS_20B), (HF_120B, GPT_OSS_120B), (HF_20B_ROPE_PARAMETERS, GPT_OSS_20B),
    (ORIGINAL_20B, GPT_OSS_20B), (ORIGINAL_120B, GPT_OSS_120B),
], ids=["hf-20b", "hf-120b", "rope_parameters-20b", "original-20b", "original-120b"])
def test_real_spellings_give_the_presets(tmp_path, raw, expected):
    assert GptOssConfig.from_json(_write(tmp_path, raw)) == expected
    assert GptOssConfig.from_dict(raw) == expected


def test_transformers_own_rewrite_reads_back():
    """transformers' GptOssConfig re-serializes the released file in its current spelling."""
    transformers = pytest.importorskip("transformers")
    rewritten = transformers.GptOssConfig.from_dict(HF_20B).to_dict()
    assert "rope_parameters" in rewritten  # the 5.x spelling, so this is a different input
    assert GptOssConfig.from_dict(rewritten) == GPT_OSS_20B


def test_presets_round_trip_through_both_writers():
    for name, config in PRESETS.items():
        assert GptOssConfig.from_dict(config.to_hf_dict()) == config, name
        assert GptOssConfig.from_dict(config.to_hf_dict(quantized=False)) == config, name
        if config.layer_types == GptOssConfig(num_hidden_layers=config.num_hidden_layers).layer_types:
            # original/config.json has no layer_types, eos or pad: only default-pattern presets
            plain = dataclasses.replace(config, eos_token_id=200002, pad_token_id=199999)
            assert GptOssConfig.from_dict(config.to_original_dict()) == plain, name


def test_layer_types_default_to_even_sliding():
    raw = {k: v for k, v in HF_20B.items() if k != "layer_types"}
    c = GptOssConfig.from_dict({**raw, "num_hidden_layers": 5})
    assert c.layer_types == (SLIDING, FULL, SLIDING, FULL, SLIDING)
    assert [c.is_sliding(i) for i in range(5)] == [True, False, True, False, True]
    explicit = GptOssConfig.from_dict({**raw, "num_hidden_layers": 2,
                                       "layer_types": [FULL, SLIDING]})
    assert explicit.layer_types == (FULL, SLIDING)


def test_tiny_chat_preset_has_real_vocab_and_distinct_dims():
    c = PRESETS["tiny-chat"]
    assert c.vocab_size == 201088
    dims = [c.hidden_size, c.intermediate_size, c.num_attention_heads, c.head_dim,
            c.num_local_experts, c.sliding_window, c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim]
    assert len(set(dims)) == len(dims)


@pytest.mark.parametrize("change, words", [
    ({"model_type": "llama"}, ["model_type", "llama"]),
    ({"architectures": ["LlamaForCausalLM"]}, ["LlamaForCausalLM"]),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, ["quant_method", "gptq"]),
    ({"num_attention_heads": 60, "num_key_value_heads": 8}, ["num_attention_heads=60", "8"]),
    ({"rope_scaling": {**HF_20B["rope_scaling"], "rope_type": "longrope"}}, ["longrope"]),
    ({"layer_types": _layer_types(23)}, ["layer_types", "23"]),
    ({"hidden_size": 2881}, ["hidden_size", "32"]),
    ({"hidden_size": "wide"}, ["hidden_size", "wide"]),
    ({"rope_scaling": {**HF_20B["rope_scaling"], "factor": "big"}}, ["big"]),
], ids=["model_type", "architecture", "quant_method", "heads", "rope_type", "layer_types",
        "hidden_size", "value_type", "rope_value_type"])
def test_bad_configs_name_the_file(tmp_path, change, words):
    path = _write(tmp_path, {**HF_20B, **change})
    with pytest.raises(ConfigError) as err:
        GptOssConfig.from_json(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nowhere" / "config.json"
    with pytest.raises(ConfigError, match="config.json") as err:
        GptOssConfig.from_json(path)
    assert str(path) in str(err.value)


def test_bad_json_names_the_file(tmp_path):
    path = _write(tmp_path, '{"model_type": "gpt_oss", "hidden_size": 2880,')
    with pytest.raises(ConfigError, match="invalid JSON") as err:
        GptOssConfig.from_json(path)
    assert str(path) in str(err.value)


def test_json_that_is_not_an_object_names_the_file(tmp_path):
    path = _write(tmp_path, "[1, 2, 3]")
    with pytest.raises(ConfigError, match="JSON object") as err:
        GptOssConfig.from_json(path)
    assert str(path) in str(err.value)


def test_config_is_frozen_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPT_OSS_20B.hidden_size = 1  # type: ignore[misc]
    assert hash(GPT_OSS_20B) == hash(GptOssConfig.from_dict(HF_20B))

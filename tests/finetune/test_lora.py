"""LoRA adapters: the forward-pass math, packing masks, PEFT files and merged exports, checked
against independent references (dense merged weights, peft + transformers, our loader)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax.finetune import export, lora
from gptoss_jax.model import transformer as M
from gptoss_jax.ops.weights import Experts

from tests.conftest import hf_logits

ALL = ("q", "k", "v", "o", "experts")


def forward(model, params, tokens):
    """Logits of ``params`` (e.g. with adapters injected) run with ``model``'s resolved runtime."""
    return M.forward(params, tokens, model.config, rt=model.runtime)


def random_adapters(c, lc, seed=3, scale=0.3):
    """Adapters with non-zero A and B (init leaves B = 0, which would test nothing)."""
    ad = lora.init(c, lc, jax.random.PRNGKey(seed))
    leaves, treedef = jax.tree.flatten(ad)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(scale * rng.standard_normal(x.shape) / np.sqrt(x.shape[-1]), jnp.float32)
              for x in leaves]
    return jax.tree.unflatten(treedef, leaves)


def dense_merged(params, adapters, lc):
    """Reference: every adapter folded into dense f32 weights (experts expanded in full)."""
    get, _ = export.merged_getter(params, jax.tree.map(np.asarray, adapters), lc)
    out = jax.tree.map(lambda x: x, params)
    for i, layer in enumerate(out["layers"]):
        for w in ("q_w", "k_w", "v_w", "o_w"):
            layer["attn"][w] = jnp.asarray(get(("layers", i, "attn", w)))
        e = layer["experts"]
        dense = {m: jnp.asarray(get(("layers", i, "experts", m)) if lc.experts else
                                export.mxfp4.dequantize_np(*getattr(e, m)))
                 for m in lora.EXPERT_MATS}
        layer["experts"] = Experts(gate_up=dense["gate_up"], gate_up_bias=e.gate_up_bias,
                                   down=dense["down"], down_bias=e.down_bias)
    return out


@pytest.fixture(scope="module")
def tokens(tiny_config):
    rng = np.random.default_rng(11)
    return rng.integers(0, tiny_config.vocab_size, size=(2, 23)).astype(np.int32)


@pytest.mark.slow
def test_fresh_adapter_is_the_base(tiny_model_f32, tiny_config, tokens):
    lc = lora.LoraConfig(rank=4, targets=ALL)
    ad = lora.init(tiny_config, lc, jax.random.PRNGKey(0))
    base = forward(tiny_model_f32, tiny_model_f32.params, tokens)
    ours = forward(tiny_model_f32, lora.inject(tiny_model_f32.params, ad, lc), tokens)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(base))


# 1-2 tokens: gather path; 5: grouped path; 23: grouped path with the gate_up rows reordered
@pytest.mark.slow
@pytest.mark.parametrize("t", [1, 2, 5, 23])
def test_adapter_equals_dense_merge(tiny_model_f32, tiny_config, tokens, t):
    lc = lora.LoraConfig(rank=5, alpha=7.0, targets=ALL)
    ad = random_adapters(tiny_config, lc)
    x = tokens[:1, :t]
    ours = forward(tiny_model_f32, lora.inject(tiny_model_f32.params, ad, lc), x)
    ref = forward(tiny_model_f32, dense_merged(tiny_model_f32.params, ad, lc), x)
    base = forward(tiny_model_f32, tiny_model_f32.params, x)
    assert float(jnp.max(jnp.abs(ref - base))) > 0.1  # the adapter matters
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=3e-5, rtol=0)


@pytest.mark.slow
def test_segments_isolate_packed_documents(tiny_model_f32, tiny_config, tokens):
    a, b = tokens[0, :9], tokens[1, :13]
    row = np.concatenate([a, b])[None]
    pos = np.concatenate([np.arange(9), np.arange(13)])[None].astype(np.int32)
    seg = np.concatenate([np.full(9, 1), np.full(13, 2)])[None].astype(np.int32)
    rt = tiny_model_f32.runtime
    x, _ = M.hidden_states(tiny_model_f32.params, row, pos, tiny_config, segment_ids=seg, rt=rt)
    packed = np.asarray(M.unembed(tiny_model_f32.params, x, rt))[0]
    alone_a = np.asarray(forward(tiny_model_f32, tiny_model_f32.params, a[None]))[0]
    alone_b = np.asarray(forward(tiny_model_f32, tiny_model_f32.params, b[None]))[0]
    np.testing.assert_allclose(packed[:9], alone_a, atol=2e-5, rtol=0)
    np.testing.assert_allclose(packed[9:], alone_b, atol=2e-5, rtol=0)


@pytest.mark.slow
def test_peft_tensors_round_trip(tiny_config):
    lc = lora.LoraConfig(rank=3, targets=ALL)
    ad = random_adapters(tiny_config, lc)
    back = export.adapters_from_peft(export.peft_tensors(ad, lc, tiny_config), lc, tiny_config)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), ad, back)
    keys = export.peft_tensors(ad, lc, tiny_config)
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight" in keys
    with pytest.raises(export.AdapterError, match="has shape"):
        export.adapters_from_peft(keys, lora.LoraConfig(rank=4, targets=ALL), tiny_config)


@pytest.fixture(scope="module")
def transformers_fresh(tiny_ckpts):
    """A transformers model of its own (peft modifies the model it wraps)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def make(path=tiny_ckpts["hf_mxfp4"]):
        kw = {}
        if "quantization_config" in open(f"{path}/config.json").read():
            kw["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
        m = transformers.GptOssForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                          attn_implementation="eager", **kw)
        return m.eval()
    return make


@pytest.mark.slow
@pytest.mark.parametrize("targets", [("q", "k", "v", "o"), ALL])
def test_peft_loads_our_adapter(tiny_model_f32, tiny_config, tokens, tmp_path, transformers_fresh,
                                targets):
    peft = pytest.importorskip("peft")
    lc = lora.LoraConfig(rank=4, alpha=8.0, targets=targets)
    ad = random_adapters(tiny_config, lc)
    export.save_peft(str(tmp_path), ad, lc, tiny_config)
    hf = peft.PeftModel.from_pretrained(transformers_fresh(), str(tmp_path)).eval()
    lengths = np.array([tokens.shape[1]] * 2)
    theirs = hf_logits(hf, tokens, lengths)
    ours = np.asarray(forward(tiny_model_f32, lora.inject(tiny_model_f32.params, ad, lc), tokens))
    base = np.asarray(tiny_model_f32(tokens))
    assert np.abs(theirs - base).max() > 0.1
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max(), rtol=0)
    # and back through our reader
    back, lc2 = export.load_peft(str(tmp_path), tiny_config)
    assert lc2 == lc
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), ad, back)


def test_merged_attention_export_is_exact(tiny_model_f32, tiny_config, tokens, tmp_path,
                                          transformers_fresh):
    lc = lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o"))
    ad = random_adapters(tiny_config, lc)
    out = str(tmp_path / "merged")
    export.write_merged(out, tiny_model_f32.params, ad, lc, tiny_config, layout="hf_mxfp4",
                        dtype="float32")
    want = np.asarray(forward(tiny_model_f32, lora.inject(tiny_model_f32.params, ad, lc), tokens))
    merged = gptoss_jax.load(out, dtype="float32", progress=False)
    assert merged.params["layers"][0]["experts"].gate_up.blocks.dtype == np.uint8
    np.testing.assert_allclose(np.asarray(merged(tokens)), want, atol=2e-5, rtol=0)
    theirs = hf_logits(transformers_fresh(out), tokens, np.array([tokens.shape[1]] * 2))
    np.testing.assert_allclose(theirs, want, atol=1e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.slow
def test_merged_expert_export(tiny_model_f32, tiny_config, tokens, tmp_path, transformers_fresh):
    lc = lora.LoraConfig(rank=4, alpha=8.0, targets=ALL)
    ad = random_adapters(tiny_config, lc)
    want = np.asarray(forward(tiny_model_f32, lora.inject(tiny_model_f32.params, ad, lc), tokens))
    # Dense experts in f32: exact.
    dense = str(tmp_path / "dense")
    export.write_merged(dense, tiny_model_f32.params, ad, lc, tiny_config, layout="hf_bf16",
                        dtype="float32")
    np.testing.assert_allclose(np.asarray(gptoss_jax.load(dense, dtype="float32", progress=False)(tokens)),
                               want, atol=2e-5, rtol=0)
    theirs = hf_logits(transformers_fresh(dense), tokens, np.array([tokens.shape[1]] * 2))
    np.testing.assert_allclose(theirs, want, atol=1e-4 * np.abs(want).max(), rtol=0)
    # MXFP4 re-quantized experts: lossy, and exactly the MXFP4 rounding of the exact merge (our
    # loader quantizes the dense export with the same quantize_np).
    packed = str(tmp_path / "packed")
    export.write_merged(packed, tiny_model_f32.params, ad, lc, tiny_config, layout="hf_mxfp4",
                        dtype="float32")
    got = gptoss_jax.load(packed, dtype="float32", progress=False)
    rounded = gptoss_jax.load(dense, dtype="float32", experts="mxfp4", progress=False)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 got.params, rounded.params)
    # The bound per weight: half the widest FP4 gap (4 -> 6) of its block, 2**(scale - 127).
    get, _ = export.merged_getter(tiny_model_f32.params, jax.tree.map(np.asarray, ad), lc)
    for m in lora.EXPERT_MATS:
        exact = get(("layers", 1, "experts", m))
        blocks, scales = map(np.asarray, getattr(got.params["layers"][1]["experts"], m))
        err = np.abs(export.mxfp4.dequantize_np(blocks, scales) - exact)
        bound = np.repeat(np.ldexp(1.0, scales.astype(np.int32) - 127), 32, axis=-1)
        assert np.all(err <= bound), m


@pytest.mark.slow
def test_load_adapter(tiny_model_f32, tiny_config, tokens, tmp_path):
    lc = lora.LoraConfig(rank=4, alpha=8.0, targets=ALL)
    ad = random_adapters(tiny_config, lc)
    export.save_peft(str(tmp_path), ad, lc, tiny_config)
    want = np.asarray(forward(tiny_model_f32, lora.inject(tiny_model_f32.params, ad, lc), tokens))
    before = np.asarray(tiny_model_f32(tokens))
    for merge in (True, False):
        adapted = export.load_adapter(tiny_model_f32, str(tmp_path), merge=merge)
        np.testing.assert_allclose(np.asarray(adapted(tokens)), want, atol=2e-5, rtol=0)
    # the model it was applied to is unchanged
    np.testing.assert_array_equal(np.asarray(tiny_model_f32(tokens)), before)


def test_config_validation():
    with pytest.raises(ValueError, match="rank"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="targets"):
        lora.LoraConfig(targets=("q", "mlp"))
    with pytest.raises(ValueError, match="dropout"):
        lora.LoraConfig(dropout=1.0)

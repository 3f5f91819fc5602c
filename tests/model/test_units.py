"""Each building block of the forward pass against transformers' own gpt-oss functions.

transformers (``modeling_gpt_oss``, ``modeling_rope_utils``, ``masking_utils``) is the
independent reference: RMSNorm, YaRN inverse frequencies and attention factor, the RoPE
rotation, attention with sinks / GQA / sliding window, the clamped SwiGLU, the router and the
expert MLP. Every dimension is a different number so a swapped axis fails loudly. f32 throughout
(tolerances ~1e-5 relative) unless a test says otherwise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import masking_utils  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.gpt_oss import modeling_gpt_oss as hf  # noqa: E402

import cpu_kernels  # noqa: E402
from gptoss_jax.model import attention as A  # noqa: E402
from gptoss_jax.model import rope  # noqa: E402
from gptoss_jax.model import transformer as M  # noqa: E402
from gptoss_jax.model.config import GPT_OSS_20B, TINY, GptOssConfig  # noqa: E402
from gptoss_jax.model.moe import moe, route, swiglu_interleaved  # noqa: E402
from gptoss_jax.ops import experts as experts_op  # noqa: E402
from gptoss_jax.ops import projection, runtime  # noqa: E402
from gptoss_jax.ops.runtime import resolve  # noqa: E402
from gptoss_jax.ops.weights import Experts, Mxfp4Weight  # noqa: E402
from pallas_kernels import mxfp4  # noqa: E402

# d=96, f=160, n=6 over k=2 (g=3), h=10, e=7 top-3, window 5, vocab 211
C = TINY


def hf_config(c: GptOssConfig):
    """transformers' GptOssConfig for ours, built field by field (not through our writer)."""
    return transformers.GptOssConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        num_local_experts=c.num_local_experts, num_experts_per_tok=c.num_experts_per_tok,
        sliding_window=c.sliding_window, rms_norm_eps=c.rms_norm_eps,
        swiglu_limit=c.swiglu_limit, max_position_embeddings=c.max_position_embeddings,
        rope_parameters={"rope_type": "yarn", "rope_theta": c.rope_theta, "factor": c.rope_factor,
                         "beta_fast": c.rope_beta_fast, "beta_slow": c.rope_beta_slow,
                         "truncate": c.rope_truncate,
                         "original_max_position_embeddings": c.original_max_position_embeddings},
        attn_implementation="eager",
    )


def t(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x, dtype=np.float32))


def n(x) -> np.ndarray:
    return x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)


def close(ours, ref, rtol=1e-5):
    ours, ref = n(ours), n(ref)
    assert ours.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(ours - ref).max()) / scale
    assert err < rtol, f"max error {err:.3g} of the reference scale (limit {rtol})"


@pytest.fixture
def rng():
    return np.random.default_rng(11)


# -- RMSNorm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm(rng, dtype):
    d = C.hidden_size
    x = (3.0 * rng.standard_normal((2, 13, d)) + 0.5).astype(np.float32)
    w = (1.0 + 0.2 * rng.standard_normal(d)).astype(np.float32)
    ref_mod = hf.GptOssRMSNorm(d, eps=C.rms_norm_eps)
    with torch.no_grad():
        ref_mod.weight.copy_(t(w))
        ref = ref_mod(t(x).to(getattr(torch, dtype)))
    ours = M.rms_norm(jnp.asarray(x, dtype), jnp.asarray(w), C.rms_norm_eps)
    assert str(ours.dtype) == dtype
    close(ours.astype(jnp.float32), ref, rtol=1e-5 if dtype == "float32" else 8e-3)


# -- YaRN ---------------------------------------------------------------------------------------
YARN_CASES = {
    "gpt-oss-20b": GPT_OSS_20B,
    "tiny": C,
    "truncated": dataclasses.replace(C, head_dim=24, rope_truncate=True, rope_theta=5000.0),
    "steep": dataclasses.replace(C, head_dim=36, rope_factor=8.0, rope_beta_fast=16.0,
                                 rope_beta_slow=2.0, original_max_position_embeddings=200,
                                 max_position_embeddings=1600),
}


@pytest.mark.parametrize("name", list(YARN_CASES))
def test_yarn_inv_freq_and_attention_factor(name):
    c = YARN_CASES[name]
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config(c), None)
    inv, factor = rope.yarn_inv_freq(c)
    assert inv.shape == (c.head_dim // 2,)
    np.testing.assert_allclose(inv, n(ref_inv), rtol=2e-6, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-12)


def test_yarn_cos_sin_match_rotary_embedding(rng):
    c = C
    positions = np.stack([np.arange(17), rng.integers(0, c.max_position_embeddings, 17)])
    emb = hf.GptOssRotaryEmbedding(hf_config(c))
    with torch.no_grad():
        ref_cos, ref_sin = emb(torch.zeros(1, dtype=torch.float32), torch.tensor(positions))
    cos, sin = rope.cos_sin(jnp.asarray(positions, jnp.int32), c)
    close(cos, ref_cos, rtol=2e-5)
    close(sin, ref_sin, rtol=2e-5)


@pytest.mark.slow
def test_rope_rotation(rng):
    b, tt, heads, h = 2, 9, C.num_attention_heads, C.head_dim
    q = rng.standard_normal((b, tt, heads, h)).astype(np.float32)
    k = rng.standard_normal((b, tt, C.num_key_value_heads, h)).astype(np.float32)
    pos = rng.integers(0, 40, (b, tt))
    cos, sin = rope.cos_sin(jnp.asarray(pos, jnp.int32), C)  # [b, t, h/2]
    # transformers keeps heads before time: [b, heads, t, h]
    ref_q, ref_k = hf.apply_rotary_pos_emb(t(q).transpose(1, 2), t(k).transpose(1, 2),
                                           t(cos), t(sin))
    close(rope.apply(jnp.asarray(q), cos, sin), ref_q.transpose(1, 2))
    close(rope.apply(jnp.asarray(k), cos, sin), ref_k.transpose(1, 2))


# -- attention ----------------------------------------------------------------------------------
class _Module(torch.nn.Module):
    """What eager_attention_forward reads off its module."""

    def __init__(self, sinks, groups):
        super().__init__()
        self.sinks = torch.nn.Parameter(sinks)
        self.num_key_value_groups = groups


def _hf_mask(b, tt, window, lengths):
    """Additive [b, 1, t, s] mask from transformers' own mask functions."""
    fn = (masking_utils.sliding_window_causal_mask_function(window) if window
          else masking_utils.causal_mask_function)
    bi = torch.arange(b)[:, None, None, None]
    qi = torch.arange(tt)[None, None, :, None]
    ki = torch.arange(tt)[None, None, None, :]
    allowed = fn(bi, torch.zeros((), dtype=torch.long), qi, ki) & (ki < torch.tensor(lengths)[bi])
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


# 12 tokens: > 2x the window; 300: three query blocks of model.self_attention
@pytest.mark.slow
@pytest.mark.parametrize("tt", [12, 300])
@pytest.mark.parametrize("window", [None, C.sliding_window], ids=["full", "sliding"])
def test_attention_with_sinks_matches_eager(rng, window, tt):
    b = 2
    kvh, g, h = C.num_key_value_heads, C.q_per_kv, C.head_dim
    lengths = np.array([tt, 2 * tt // 3])
    q = rng.standard_normal((b, tt, kvh * g, h)).astype(np.float32)
    k = rng.standard_normal((b, tt, kvh, h)).astype(np.float32)
    v = rng.standard_normal((b, tt, kvh, h)).astype(np.float32)
    sinks = (2.0 * rng.standard_normal(kvh * g)).astype(np.float32)  # large: the sink matters
    mask = _hf_mask(b, tt, window, lengths)
    visible = int((mask[0, 0] == 0).sum())  # keys seen by the full-length row
    assert visible == (tt * (tt + 1) // 2 if window is None
                       else sum(min(i + 1, window) for i in range(tt)))
    ref, _ = hf.eager_attention_forward(
        _Module(t(sinks), g).eval(), t(q).transpose(1, 2), t(k).transpose(1, 2),
        t(v).transpose(1, 2), mask, scaling=h ** -0.5)  # [b, t, n, h]
    pos = np.where(np.arange(tt)[None] < lengths[:, None], np.arange(tt)[None], -1)
    pos = jnp.asarray(pos, jnp.int32)
    heads_first = lambda a: jnp.asarray(a).transpose(0, 2, 1, 3)
    ours = A.self_attention(jnp.asarray(q).reshape(b, tt, kvh, g, h), heads_first(k),
                            heads_first(v), pos, pos, jnp.asarray(sinks).reshape(kvh, g), window)
    ours = np.asarray(ours).reshape(b, tt, kvh * g, h)
    for bi, length in enumerate(lengths):  # padded query rows are unspecified
        close(ours[bi, :length], ref[bi, :length])


@pytest.mark.parametrize("window", [None, C.sliding_window], ids=["full", "sliding"])
def test_blocked_self_attention_keeps_packed_segments_apart(rng, window):
    """Packed training rows (positions restart per document) through the query-block path,
    against transformers' eager attention with the document mask built here in numpy."""
    b, tt = 2, 300  # three query blocks
    kvh, g, h = C.num_key_value_heads, C.q_per_kv, C.head_dim
    seg = np.stack([np.repeat([0, 1, 2], [140, 100, 60]), np.repeat([0, 1], [250, 50])])
    pos = np.stack([np.concatenate([np.arange(n) for n in np.bincount(row)]) for row in seg])
    q = rng.standard_normal((b, tt, kvh * g, h)).astype(np.float32)
    k = rng.standard_normal((b, tt, kvh, h)).astype(np.float32)
    v = rng.standard_normal((b, tt, kvh, h)).astype(np.float32)
    sinks = (2.0 * rng.standard_normal(kvh * g)).astype(np.float32)
    qp, kp = pos[:, :, None], pos[:, None, :]
    allowed = (seg[:, :, None] == seg[:, None, :]) & (kp <= qp)
    if window is not None:
        allowed &= qp - kp < window
    mask = torch.where(torch.tensor(allowed)[:, None], 0.0, torch.finfo(torch.float32).min)
    ref, _ = hf.eager_attention_forward(
        _Module(t(sinks), g).eval(), t(q).transpose(1, 2), t(k).transpose(1, 2),
        t(v).transpose(1, 2), mask, scaling=h ** -0.5)  # [b, t, n, h]
    heads_first = lambda a: jnp.asarray(a).transpose(0, 2, 1, 3)
    pos, seg = jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32)
    ours = A.self_attention(jnp.asarray(q).reshape(b, tt, kvh, g, h), heads_first(k),
                            heads_first(v), pos, pos, jnp.asarray(sinks).reshape(kvh, g), window,
                            seg, seg)
    close(np.asarray(ours).reshape(b, tt, kvh * g, h), ref)


@pytest.mark.slow
def test_attention_block_matches_module(rng):
    """The whole attention block (projections with biases, YaRN, GQA, sinks, window) against
    GptOssAttention with the same weights; torch Linear [out, in] mapped by hand."""
    c = C
    d, nh, kvh, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    b, tt, layer = 2, 11, 0  # layer 0 slides
    assert c.is_sliding(layer)
    cfg = hf_config(c)
    mod = hf.GptOssAttention(cfg, layer_idx=layer).eval()
    weights = {name: rng.standard_normal(tuple(p.shape)).astype(np.float32) * 0.3
               for name, p in mod.named_parameters()}
    with torch.no_grad():
        for name, p in mod.named_parameters():
            p.copy_(t(weights[name]))
    x = rng.standard_normal((b, tt, d)).astype(np.float32)
    positions = torch.arange(tt)[None].expand(b, tt)
    cos, sin = hf.GptOssRotaryEmbedding(cfg)(torch.zeros(1), positions)
    with torch.no_grad():
        ref, _ = mod(t(x), (cos, sin), _hf_mask(b, tt, c.sliding_window, [tt, tt]))

    def proj_in(w, heads):  # [heads*h, d] -> [d, heads, h]
        return jnp.asarray(w.reshape(heads, h, d).transpose(2, 0, 1))

    p = {"q_w": proj_in(weights["q_proj.weight"], nh), "q_b": weights["q_proj.bias"].reshape(nh, h),
         "k_w": proj_in(weights["k_proj.weight"], kvh), "k_b": weights["k_proj.bias"].reshape(kvh, h),
         "v_w": proj_in(weights["v_proj.weight"], kvh), "v_b": weights["v_proj.bias"].reshape(kvh, h),
         "o_w": jnp.asarray(weights["o_proj.weight"].reshape(d, nh, h).transpose(1, 2, 0)),
         "o_b": weights["o_proj.bias"], "sinks": weights["sinks"]}
    pos = jnp.broadcast_to(jnp.arange(tt, dtype=jnp.int32), (b, tt))
    ocos, osin = rope.cos_sin(pos, c)
    ours, _ = A.attention(jnp.asarray(x), p, c, layer, pos, ocos, osin, None)
    close(ours, ref, rtol=2e-5)


# -- MoE ----------------------------------------------------------------------------------------
def test_swiglu_clamp_matches_experts_gate(rng):
    f = C.intermediate_size
    h = rng.uniform(-20, 20, size=(5, 2 * f)).astype(np.float32)  # well past the 7.0 clamp
    assert (np.abs(h) > C.swiglu_limit).mean() > 0.3
    experts = hf.GptOssExperts(hf_config(C))
    ref = experts._apply_gate(t(h))
    close(swiglu_interleaved(jnp.asarray(h), C.swiglu_limit, C.swiglu_alpha), ref)


def _random_mlp(rng, c: GptOssConfig):
    """Random packed experts + router, and transformers' GptOssMLP holding the same weights."""
    e, d, f = c.num_local_experts, c.hidden_size, c.intermediate_size
    gu_blocks, gu_scales = mxfp4.random_packed(rng, (e, 2 * f, d), scale_range=(121, 124))
    dn_blocks, dn_scales = mxfp4.random_packed(rng, (e, d, f), scale_range=(121, 124))
    gate_up = mxfp4.dequantize_np(gu_blocks, gu_scales)  # [e, 2f, d], rows = outputs
    down = mxfp4.dequantize_np(dn_blocks, dn_scales)  # [e, d, f]
    gu_bias = rng.standard_normal((e, 2 * f)).astype(np.float32)
    dn_bias = rng.standard_normal((e, d)).astype(np.float32)
    router_w = (2.0 / np.sqrt(d) * rng.standard_normal((e, d))).astype(np.float32)  # torch [e, d]
    router_b = (0.1 * rng.standard_normal(e)).astype(np.float32)
    mlp = hf.GptOssMLP(hf_config(c)).eval()
    with torch.no_grad():
        mlp.router.weight.copy_(t(router_w))
        mlp.router.bias.copy_(t(router_b))
        mlp.experts.gate_up_proj.copy_(t(gate_up.transpose(0, 2, 1)))  # transformers: [e, d, 2f]
        mlp.experts.gate_up_proj_bias.copy_(t(gu_bias))
        mlp.experts.down_proj.copy_(t(down.transpose(0, 2, 1)))  # [e, f, d]
        mlp.experts.down_proj_bias.copy_(t(dn_bias))
    packed = Experts(gate_up=Mxfp4Weight(gu_blocks, gu_scales), gate_up_bias=gu_bias,
                     down=Mxfp4Weight(dn_blocks, dn_scales), down_bias=dn_bias)
    dense = Experts(gate_up=gate_up, gate_up_bias=gu_bias, down=down, down_bias=dn_bias)
    router = {"w": router_w.T.copy(), "b": router_b}
    return mlp, router, packed, dense


def test_router_matches_topk_router(rng):
    mlp, router, _, _ = _random_mlp(rng, C)
    x = rng.standard_normal((23, C.hidden_size)).astype(np.float32)
    with torch.no_grad():
        _, ref_w, ref_idx = mlp.router(t(x))
    w, idx = route(jnp.asarray(x), jax_tree(router), C.num_experts_per_tok)
    np.testing.assert_array_equal(np.asarray(idx), ref_idx.numpy())
    close(w, ref_w)


def jax_tree(tree):
    return jax.tree.map(jnp.asarray, tree)


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [2, 29], ids=["gather", "grouped"])  # t*k <= e picks gather
@pytest.mark.parametrize("fmt", ["mxfp4", "dense"])
def test_moe_matches_gpt_oss_mlp(rng, tokens, fmt):
    mlp, router, packed, dense = _random_mlp(rng, C)
    # Inputs large enough that the SwiGLU clamp is active for a good share of the units.
    x = (4.0 * rng.standard_normal((1, tokens, C.hidden_size))).astype(np.float32)
    with torch.no_grad():
        ref, _ = mlp(t(x))
        h = t(x[0]) @ mlp.experts.gate_up_proj[0] + mlp.experts.gate_up_proj_bias[0]
    assert (h.abs() > C.swiglu_limit).float().mean() > 0.05  # the clamp is exercised
    layer = {"router": jax_tree(router), "experts": jax_tree(packed if fmt == "mxfp4" else dense)}
    ops = resolve(experts="xla")
    assert experts_op.backend(layer["experts"], tokens * C.num_experts_per_tok, ops,
                              jnp.float32) == ("gather" if tokens == 2 else "xla")
    ours = moe(jnp.asarray(x[0]), layer, C, ops)
    close(ours, ref[0], rtol=2e-5)


# The CPU paths with the kernels (skipped where a kernel does not build) and without them (the
# XLA fallback a machine without AVX-512 runs: bf16 rows padded to 8, the f32 vector-matrix
# unembedding, the gather path and the tiled loop): the same references, never skipped.
CPU_PATHS = [pytest.param(True, id="cpu_kernel"), pytest.param(False, id="xla_fallback")]


def cpu_ops(kernels: bool, name: str, **kw):
    """Resolved CPU ops with the CPU kernels on (skips where ``name`` does not build) or off."""
    if kernels and not cpu_kernels.available(name):
        pytest.skip(f"the CPU kernel {name} does not build here")
    return resolve(platform="cpu", use_cpu_kernels=kernels, **kw)


def branches():
    """Every ISA branch of the dispatched kernels this CPU runs (each forced through the ops)."""
    return [pytest.param(b, id=b) for b in cpu_kernels.isa.supported()] or [
        pytest.param(None, id="no-avx2")]


@pytest.mark.slow
@pytest.mark.parametrize("kernels", CPU_PATHS)
@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("branch", branches())
def test_projection_cpu_paths_value_and_gradient(rng, kernels, rows, branch):
    """Decode-sized projections of a bf16 weight stored [in, heads, head_dim]: up to 4 rows in
    the CPU kernel (bf16_vecmat, on each ISA branch), else (and without kernels) XLA with the
    rows padded to 8; values and both gradients against numpy."""
    d, n, h = C.hidden_size, C.num_attention_heads, C.head_dim
    w = jnp.asarray(0.1 * rng.standard_normal((d, n, h)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((1, rows, d)), jnp.bfloat16)
    g = rng.standard_normal((1, rows, n, h)).astype(np.float32)
    ops = cpu_ops(kernels, "bf16_vecmat", cpu_isa=branch if kernels else None)
    f = lambda x, w: projection.project("rd,dnh->rnh", x, w, ops)
    assert ("gptoss_bf16_vecmat" in jax.jit(f).lower(x, w).as_text()) == (kernels and rows <= 4)
    x64, w64 = np.asarray(x, np.float64).reshape(rows, d), np.asarray(w, np.float64).reshape(d, -1)
    close(f(x, w), (x64 @ w64).reshape(1, rows, n, h), rtol=1e-5)
    dx, dw = jax.grad(lambda x, w: jnp.sum(f(x, w) * g), argnums=(0, 1))(x, w)
    g2 = g.reshape(rows, -1).astype(np.float64)
    close(dx.astype(jnp.float32), (g2 @ w64.T).reshape(x.shape), rtol=1e-2)  # bf16 results
    close(dw.astype(jnp.float32), (x64.T @ g2).reshape(w.shape), rtol=1e-2)


@pytest.mark.parametrize("kernels", CPU_PATHS)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("branch", branches())
def test_unembedding_cpu_paths_value_and_gradient(rng, kernels, rows, branch):
    """The unembedding (weight [vocab, d], bf16): up to 8 rows (AVX-512 BF16; 4 on the other
    branches) in the CPU kernel, which also takes the argmax; without it one row as XLA's f32
    vector-matrix product, more rows padded to 8; values, argmax and both gradients against
    numpy."""
    d, v = C.hidden_size, C.vocab_size
    w = jnp.asarray(0.1 * rng.standard_normal((v, d)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((rows, d)), jnp.bfloat16)
    g = rng.standard_normal((rows, v)).astype(np.float32)
    rt = M.Runtime(ops=cpu_ops(kernels, "bf16_gemv", cpu_isa=branch if kernels else None))
    f = lambda x, w: M.unembed({"unembed": w}, x, rt)
    in_kernel = kernels and rows <= runtime.CPU_GEMV_MAX_ROWS.get(branch, 0)
    assert ("gptoss_bf16_gemv" in jax.jit(f).lower(x, w).as_text()) == in_kernel
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    close(f(x, w), x64 @ w64.T, rtol=1e-5)
    logits, greedy = jax.jit(lambda x, w: M.unembed_greedy({"unembed": w}, x, rt))(x, w)
    assert (greedy is not None) == in_kernel
    if in_kernel:
        np.testing.assert_array_equal(np.asarray(greedy), np.argmax(np.asarray(logits), -1))
    dx, dw = jax.grad(lambda x, w: jnp.sum(f(x, w) * g), argnums=(0, 1))(x, w)
    close(dx.astype(jnp.float32), g @ w64, rtol=1e-2)  # bf16 results
    close(dw.astype(jnp.float32), g.T @ x64, rtol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", CPU_PATHS)
@pytest.mark.parametrize("tokens", [2, 29])
def test_moe_cpu_paths_match_gpt_oss_mlp(rng, kernels, tokens):
    """The CPU expert paths, the C++ kernel or (without kernels) XLA's gather path and tiled
    loop: values and the gradient w.r.t. the input (which LoRA training takes through the
    frozen experts) against transformers' GptOssMLP."""
    mlp, router, packed, _ = _random_mlp(rng, C)
    x = (4.0 * rng.standard_normal((tokens, C.hidden_size))).astype(np.float32)
    g = rng.standard_normal((tokens, C.hidden_size)).astype(np.float32)  # output cotangent
    xt = t(x).requires_grad_(True)
    ref, _ = mlp(xt[None])
    (ref[0] * t(g)).sum().backward()
    layer = {"router": jax_tree(router), "experts": jax_tree(packed)}
    ops = cpu_ops(kernels, "mxfp4_grouped", experts="cpu" if kernels else "auto")
    want = "mxfp4_grouped" if kernels else ("gather" if tokens == 2 else "xla")  # f32 rows
    assert experts_op.backend(layer["experts"], tokens * C.num_experts_per_tok, ops,
                              jnp.float32) == want
    f = jax.jit(lambda x: moe(x, layer, C, ops))
    close(f(jnp.asarray(x)), ref[0].detach(), rtol=2e-5)
    # through the router too (top-k is piecewise constant: the same experts on both sides)
    grad = jax.grad(lambda x: jnp.sum(moe(x, layer, C, ops) * g))(jnp.asarray(x))
    close(grad, xt.grad, rtol=5e-5)


def _bf16(a):
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [1, 8, 80])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "grouped"])
@pytest.mark.parametrize("branch", [*branches(), pytest.param("xla", id="xla_fallback")])
def test_moe_bf16_rows_match_gpt_oss_mlp(rng, tokens, branch, fused):
    """bf16 decode rows through the CPU kernels (each ISA branch forced): the whole MLP in
    expert_mlp, or (fused off) the two grouped matmuls in mxfp4_gemv; or without kernels through
    XLA (gather path at one token, the sorted loop at 8); 80 tokens (a prefill: 240 pairs, past
    32 per expert) through expert_mlp's panel GEMM on the branches that take it, XLA's loop on
    the others; against transformers' GptOssMLP in f32 on the same bf16-exact inputs and
    weights (bf16 tolerance: the activations between the two matmuls are bf16 here); the
    gradient w.r.t. the bf16 input too (the kernels' is XLA's)."""
    if branch == "xla" and not fused:
        pytest.skip("one XLA fallback case is enough")
    if tokens == 80 and not fused:
        pytest.skip("prefill sizes: no grouped kernel (XLA's loop, the xla_fallback case)")
    kernel = "expert_mlp" if fused else "mxfp4_gemv"
    if branch is None or (branch != "xla" and not cpu_kernels.available(kernel)):
        pytest.skip(f"the {kernel} kernel does not build here")
    mlp, router, packed, _ = _random_mlp(rng, C)
    router = {"w": _bf16(router["w"]), "b": _bf16(router["b"])}
    packed = packed._replace(gate_up_bias=_bf16(packed.gate_up_bias),
                             down_bias=_bf16(packed.down_bias))
    with torch.no_grad():  # the same bf16-exact router and biases on transformers' side
        mlp.router.weight.copy_(t(router["w"].T))
        mlp.router.bias.copy_(t(router["b"]))
        mlp.experts.gate_up_proj_bias.copy_(t(packed.gate_up_bias))
        mlp.experts.down_proj_bias.copy_(t(packed.down_bias))
    x = _bf16(2.0 * rng.standard_normal((tokens, C.hidden_size)))
    g = rng.standard_normal((tokens, C.hidden_size)).astype(np.float32)
    xt = t(x).requires_grad_(True)
    ref = mlp(xt[None])[0][0]
    (ref * t(g)).sum().backward()
    layer = {"router": jax_tree(router), "experts": jax_tree(packed)}
    if branch == "xla":
        ops, want = resolve(platform="cpu", use_cpu_kernels=False), (
            "gather" if tokens * C.num_experts_per_tok <= C.num_local_experts else "xla")
    else:
        ops, want = resolve(platform="cpu", cpu_isa=branch), kernel
        if tokens == 80 and branch not in runtime.CPU_PREFILL_GEMM_BRANCHES:
            want = "xla"
        if not fused:
            ops = dataclasses.replace(ops, cpu_kernels=ops.cpu_kernels - {"expert_mlp"})
    xb = jnp.asarray(x, jnp.bfloat16)
    assert experts_op.backend(layer["experts"], tokens * C.num_experts_per_tok, ops,
                              jnp.bfloat16) == want
    f = jax.jit(lambda x: moe(x, layer, C, ops))
    assert ("gptoss_mxfp4_gemv" in f.lower(xb).as_text()) == (want == "mxfp4_gemv")
    assert ("gptoss_expert_mlp" in f.lower(xb).as_text()) == (want == "expert_mlp")
    close(f(xb).astype(jnp.float32), ref.detach(), rtol=2e-2)
    grad = jax.grad(lambda x: jnp.sum(moe(x, layer, C, ops).astype(jnp.float32) * g))(xb)
    close(grad.astype(jnp.float32), xt.grad, rtol=3e-2)

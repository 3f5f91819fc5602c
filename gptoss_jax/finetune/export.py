"""Adapters out (and back in): PEFT files, and merged Hugging Face checkpoints.

PEFT layout (``adapter_config.json`` + ``adapter_model.safetensors``, as ``peft`` 0.17+ writes
for ``GptOssForCausalLM``):

* attention: ``base_model.model.model.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight``,
  ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]`` (torch ``Linear`` orientation);
* experts (``target_parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``):
  PEFT nests one ``ParamWrapper`` per parameter, the first listed innermost, so gate_up is
  ``...mlp.experts.base_layer.lora_{A,B}.weight`` and down is ``...mlp.experts.lora_{A,B}.weight``.
  ``lora_A`` is ``[e*r, in]`` (expert-major rows), ``lora_B`` ``[out, r*e]`` (column
  ``j*e + expert``); ``delta[e] = scale * (B_e @ A_e)`` in the experts' ``[e, in, out]`` weights.

Merged checkpoints: ``write_merged`` adds ``scale * A @ B`` to the dense weights in f32 and writes
the result through ``convert.writer``; adapted experts are expanded one layer at a time,
updated, and re-quantized to MXFP4 for ``hf_mxfp4`` (lossy: the update is rounded to the FP4
grid) or written dense for ``hf_bf16``. ``dtype="float32"`` stores float32 tensors instead of
bf16 (exact merges for tests and for further training).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from convert import safetensors_io as sio
from convert import writer
from gptoss_jax.finetune import lora
from gptoss_jax.model.config import GptOssConfig
from pallas_kernels import mxfp4

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers."
MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # order fixes the nesting
EXPERT_KEYS = {"gate_up": "mlp.experts.base_layer.", "down": "mlp.experts."}


class AdapterError(ValueError):
    """An adapter folder that does not fit this model."""


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


def peft_tensors(adapters: dict, lc: lora.LoraConfig, c: GptOssConfig) -> dict[str, np.ndarray]:
    """The adapter tree as PEFT state-dict tensors (float32)."""
    n, h, e, r = c.num_attention_heads, c.head_dim, c.num_local_experts, lc.rank
    out = {}
    for i, layer in enumerate(adapters["layers"]):
        for t, ab in layer.get("attn", {}).items():
            a, b = _np(ab["a"]), _np(ab["b"])
            key = f"{PREFIX}{i}.self_attn.{MODULES[t]}."
            if t == "o":
                out[key + "lora_A.weight"] = a.reshape(n * h, r).T
                out[key + "lora_B.weight"] = b.T
            else:
                out[key + "lora_A.weight"] = a.T
                out[key + "lora_B.weight"] = b.reshape(r, -1).T
        for m, ab in layer.get("experts", {}).items():
            a, b = _np(ab["a"]), _np(ab["b"])  # [e, r, K], [e, N, r]
            key = f"{PREFIX}{i}.{EXPERT_KEYS[m]}"
            out[key + "lora_A.weight"] = a.reshape(e * r, -1)
            out[key + "lora_B.weight"] = b.transpose(1, 2, 0).reshape(b.shape[1], r * e)
    return {key: np.ascontiguousarray(v) for key, v in out.items()}


def adapters_from_peft(tensors: dict[str, np.ndarray], lc: lora.LoraConfig, c: GptOssConfig) -> dict:
    """Inverse of :func:`peft_tensors`; checks every expected key and shape, and no extras."""
    n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    e, r = c.num_local_experts, lc.rank
    heads = {"q": n, "k": k, "v": k}
    used = set()

    def take(key, shape):
        if key not in tensors:
            raise AdapterError(f"adapter has no tensor {key}")
        arr = np.asarray(tensors[key], np.float32)
        if arr.shape != shape:
            raise AdapterError(f"adapter tensor {key} has shape {list(arr.shape)}, this model "
                               f"needs {list(shape)}")
        used.add(key)
        return arr

    d, f = c.hidden_size, c.intermediate_size
    layers = []
    for i in range(c.num_hidden_layers):
        layer = {"attn": {}}
        for t in lc.attn_targets:
            key = f"{PREFIX}{i}.self_attn.{MODULES[t]}."
            if t == "o":
                a = take(key + "lora_A.weight", (r, n * h)).T.reshape(n, h, r)
                b = take(key + "lora_B.weight", (d, r)).T
            else:
                a = take(key + "lora_A.weight", (r, d)).T
                b = take(key + "lora_B.weight", (heads[t] * h, r)).T.reshape(r, heads[t], h)
            layer["attn"][t] = {"a": a, "b": b}
        if lc.experts:
            layer["experts"] = {}
            for m, (kin, nout) in {"gate_up": (d, 2 * f), "down": (f, d)}.items():
                key = f"{PREFIX}{i}.{EXPERT_KEYS[m]}"
                a = take(key + "lora_A.weight", (e * r, kin)).reshape(e, r, kin)
                b = take(key + "lora_B.weight", (nout, r * e)).reshape(nout, r, e).transpose(2, 0, 1)
                layer["experts"][m] = {"a": a, "b": b}
        layers.append(layer)
    extra = sorted(set(tensors) - used)
    if extra:
        raise AdapterError(f"adapter tensor {extra[0]} is not part of this LoRA configuration "
                           f"({len(extra)} unexpected)")
    return {"layers": layers}


def save_peft(out_dir: str, adapters: dict, lc: lora.LoraConfig, c: GptOssConfig, *,
              base_model: str | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (loadable by peft)."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = peft_tensors(adapters, lc, c)
    specs = {key: (np.dtype(np.float32), v.shape) for key, v in tensors.items()}
    sio.write(os.path.join(out_dir, ADAPTER_WEIGHTS), specs, lambda key: tensors[key])
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lc.rank, "lora_alpha": lc.alpha,
        # peft refuses dropout on parameter targets; ours applies it to attention only
        "lora_dropout": 0.0 if lc.experts else lc.dropout,
        "target_modules": [MODULES[t] for t in lc.attn_targets] or None,
        "target_parameters": EXPERT_PARAMS if lc.experts else None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {},
    }
    tmp = os.path.join(out_dir, ADAPTER_CONFIG + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(cfg, fh, indent=2)
    os.replace(tmp, os.path.join(out_dir, ADAPTER_CONFIG))


def read_peft_config(adapter_dir: str) -> lora.LoraConfig:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except FileNotFoundError:
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_CONFIG}") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: invalid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise AdapterError(f"{path}: {flag}=true is not supported")
    for field in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if cfg.get(field):
            raise AdapterError(f"{path}: {field} is not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={cfg['bias']!r} is not supported")
    modules = cfg.get("target_modules") or []
    if isinstance(modules, str):
        raise AdapterError(f"{path}: target_modules as a regex is not supported; list the modules")
    names = {v: k for k, v in MODULES.items()}
    unknown = [m for m in modules if m not in names]
    if unknown:
        raise AdapterError(f"{path}: target module {unknown[0]!r} is not one of {list(names)}")
    params = cfg.get("target_parameters") or []
    if params and sorted(params) != sorted(EXPERT_PARAMS):
        raise AdapterError(f"{path}: target_parameters must be {EXPERT_PARAMS}, got {params}")
    if params and params != EXPERT_PARAMS:
        raise AdapterError(f"{path}: target_parameters in the order {params} nest differently; "
                           f"expected {EXPERT_PARAMS}")
    targets = tuple(t for t in lora.ATTN_TARGETS if MODULES[t] in modules)
    if params:
        targets += ("experts",)
    dropout = cfg.get("lora_dropout") or 0.0
    try:
        return lora.LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                               dropout=float(dropout or 0.0), targets=targets)
    except (KeyError, ValueError) as e:
        raise AdapterError(f"{path}: {e}") from None


def load_peft(adapter_dir: str, c: GptOssConfig) -> tuple[dict, lora.LoraConfig]:
    """(adapter tree as numpy f32, LoraConfig) from a PEFT folder, checked against config ``c``."""
    lc = read_peft_config(adapter_dir)
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    st = sio.SafetensorsFile(path)
    tensors = {key: st.read(key) for key in st.keys()}
    try:
        return adapters_from_peft(tensors, lc, c), lc
    except AdapterError as e:
        raise AdapterError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Merged checkpoints
# ---------------------------------------------------------------------------------------------


def merged_getter(params: dict, adapters: dict, lc: lora.LoraConfig):
    """(``get(path)`` over the merged tree, packed_tree) for ``convert.writer``.

    Attention weights come back merged; with expert adapters the getter serves dense
    ``gate_up`` / ``down`` (base expanded + update, one layer's matrix at a time).
    """
    get = writer.tree_getter(params)
    packed = params["layers"][0]["experts"].packed
    weights = {v: k for k, v in lora._ATTN_WEIGHT.items()}

    def merged(path):
        if path[0] == "layers" and path[2] == "attn" and path[3] in weights:
            ab = adapters["layers"][path[1]].get("attn", {}).get(weights[path[3]])
            w = get(path).astype(np.float32)
            return w if ab is None else w + lora.attn_delta(ab, weights[path[3]], lc.scale, xp=np)
        if path[0] == "layers" and path[2] == "experts" and len(path) == 4 and path[3] in lora.EXPERT_MATS:
            w = (mxfp4.dequantize_np(get(path + ("blocks",)), get(path + ("scales",)))
                 if packed else get(path).astype(np.float32))
            ab = adapters["layers"][path[1]]["experts"][path[3]]
            return w + lora.expert_delta(ab, lc.scale, xp=np)
        return get(path)

    return merged, packed and not lc.experts


def write_merged(out_dir: str, params: dict, adapters: dict, lc: lora.LoraConfig,
                 c: GptOssConfig, *, layout: str = "hf_mxfp4", dtype: str = "bfloat16",
                 progress: bool = False) -> list[str]:
    """A Hugging Face checkpoint of base + adapter (see module doc), loadable by transformers and
    ``gptoss_jax.load``. ``dtype``: storage of the dense tensors, bfloat16 (as released) or
    float32."""
    if layout not in ("hf_mxfp4", "hf_bf16"):
        raise ValueError(f"merged export layout must be hf_mxfp4 or hf_bf16, not {layout!r}")
    get, packed_tree = merged_getter(params, jax.tree.map(_np, adapters), lc)
    floats = {"bfloat16": writer.BF16, "bf16": writer.BF16, "float32": np.float32, "f32": np.float32}
    if dtype not in floats:
        raise ValueError(f"merged export dtype must be bfloat16 or float32, not {dtype!r}")
    return writer.write_checkpoint(get, c, out_dir, layout, packed_tree=packed_tree,
                                   float_dtype=floats[dtype], progress=progress)


def load_adapter(model, adapter_dir: str, *, merge: bool = True):
    """``model`` (a ``gptoss_jax.Model``) with the PEFT adapter in ``adapter_dir`` applied.

    ``merge`` (default) folds the attention adapters into the dense weights, so generation runs
    at base speed; expert adapters always stay separate leaves next to the packed experts.
    ``merge=False`` keeps every adapter as a leaf (exactly the training-time computation).
    """
    adapters, lc = load_peft(adapter_dir, model.config)
    params = jax.tree.map(lambda x: x, model.params)  # new containers, same arrays
    dtype = model.params["embed"].dtype
    adapters = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), adapters)
    # the expert adapters are cast to the model dtype once, not on every step
    if merge:
        params = lora.merge_attention(params, adapters, lc, expert_dtype=dtype)
    else:
        params = lora.inject(params, adapters, lc, expert_dtype=dtype)
    return model.replace(params=params)

"""The frozen gpt-oss model config, read from any of the three real ``config.json`` spellings.

Field names follow Hugging Face's ``config.json`` for gpt-oss. ``GptOssConfig.from_dict``
accepts:

* the released HF files (``rope_scaling`` dict + top-level ``rope_theta``),
* newer transformers (``rope_parameters`` dict holding ``rope_theta`` too),
* OpenAI's ``original/config.json`` (``num_experts``, ``experts_per_token``,
  ``rope_scaling_factor``, ``rope_ntk_alpha`` / ``rope_ntk_beta``, ``initial_context_length``).

Runtime choices (dtype, mesh, kernels, sampling) are not model config and live elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    """A config.json that cannot describe a gpt-oss model."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class GptOssConfig:
    vocab_size: int = 201088  # embedding / unembedding rows (o200k_harmony, padded)
    hidden_size: int = 2880  # model width d
    intermediate_size: int = 2880  # per-expert MLP width f (gate_up projects to 2f)
    num_hidden_layers: int = 24
    num_attention_heads: int = 64  # query heads n
    num_key_value_heads: int = 8  # kv heads k (GQA groups g = n / k)
    head_dim: int = 64  # h; not hidden_size / heads in gpt-oss
    num_local_experts: int = 32  # experts e
    num_experts_per_tok: int = 4  # top-k routing
    sliding_window: int = 128  # keys a sliding layer sees, the query included
    layer_types: tuple[str, ...] = ()  # per layer SLIDING or FULL; () = even layers slide
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0  # clamp for gate (max) and up (both sides)
    swiglu_alpha: float = 1.702  # sigmoid sharpness in the gpt-oss SwiGLU
    rope_theta: float = 150000.0
    rope_factor: float = 32.0  # YaRN context extension factor (1.0 = plain RoPE)
    rope_beta_fast: float = 32.0  # YaRN ramp bound in rotations (original: rope_ntk_beta)
    rope_beta_slow: float = 1.0  # YaRN ramp bound in rotations (original: rope_ntk_alpha)
    rope_truncate: bool = False  # floor/ceil the YaRN ramp bounds (gpt-oss: no)
    original_max_position_embeddings: int = 4096  # pre-YaRN context (initial_context_length)
    max_position_embeddings: int = 131072
    eos_token_id: int = 200002
    pad_token_id: int = 199999

    def __post_init__(self):
        if not self.layer_types:
            types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "num_local_experts", "num_experts_per_tok", "sliding_window"):
            need(int(getattr(self, name)) > 0, f"config field {name} must be positive, "
                 f"got {getattr(self, name)!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads={self.num_attention_heads} is not a multiple of "
             f"num_key_value_heads={self.num_key_value_heads}")
        need(self.num_experts_per_tok <= self.num_local_experts,
             f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
             f"num_local_experts={self.num_local_experts}")
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        for name in ("hidden_size", "intermediate_size"):
            need(getattr(self, name) % 32 == 0,
                 f"{name}={getattr(self, name)} must be a multiple of 32 (MXFP4 blocks)")
        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries for "
             f"num_hidden_layers={self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        need(not bad, f"unknown layer_types {bad}; expected {SLIDING!r} or {FULL!r}")
        need(self.rope_factor >= 1.0, f"rope factor {self.rope_factor} must be >= 1")

    # -- derived ---------------------------------------------------------------------------
    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config.json") -> GptOssConfig:
        """Build from a parsed config.json in any of the three spellings (see module doc)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        raw = dict(raw)
        model_type = raw.get("model_type")
        arch = raw.get("architectures") or []
        if model_type not in (None, "gpt_oss") or (arch and "GptOssForCausalLM" not in arch):
            raise ConfigError(f"{source}: unsupported architecture model_type={model_type!r} "
                              f"architectures={arch!r}; expected gpt_oss / GptOssForCausalLM")
        quant = raw.get("quantization_config") or {}
        method = quant.get("quant_method") if isinstance(quant, Mapping) else quant
        if method not in (None, "mxfp4"):
            raise ConfigError(f"{source}: unsupported quantization_config.quant_method "
                              f"{method!r}; gpt-oss checkpoints use mxfp4 (or none for bf16)")
        kw: dict[str, Any] = {}

        def take(field, *names, conv=int):
            for name in names:
                if raw.get(name) is not None:
                    try:
                        kw[field] = conv(raw[name])
                    except (TypeError, ValueError):
                        raise ConfigError(f"{source}: {name}={raw[name]!r} is not a valid "
                                          f"{conv.__name__}") from None
                    return

        take("vocab_size", "vocab_size")
        take("hidden_size", "hidden_size")
        take("intermediate_size", "intermediate_size")
        take("num_hidden_layers", "num_hidden_layers")
        take("num_attention_heads", "num_attention_heads")
        take("num_key_value_heads", "num_key_value_heads")
        take("head_dim", "head_dim")
        take("num_local_experts", "num_local_experts", "num_experts")
        take("num_experts_per_tok", "num_experts_per_tok", "experts_per_token")
        take("sliding_window", "sliding_window")
        take("rms_norm_eps", "rms_norm_eps", conv=float)
        take("swiglu_limit", "swiglu_limit", conv=float)
        take("max_position_embeddings", "max_position_embeddings")
        take("original_max_position_embeddings", "initial_context_length")
        for field in ("eos_token_id", "pad_token_id"):
            value = raw.get(field)
            if isinstance(value, list) and value:
                value = value[0]
            if value is not None:
                kw[field] = int(value)
        if raw.get("layer_types"):
            kw["layer_types"] = tuple(raw["layer_types"])

        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, Mapping):
            raise ConfigError(f"{source}: rope_scaling/rope_parameters must be an object")
        theta = rope.get("rope_theta", raw.get("rope_theta"))
        if theta is not None:
            kw["rope_theta"] = float(theta)
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type not in (None, "yarn", "default"):
            raise ConfigError(f"{source}: unsupported rope_type {rope_type!r}; gpt-oss uses yarn")
        if rope_type == "default":
            kw["rope_factor"] = 1.0
        if "factor" in rope:
            kw["rope_factor"] = float(rope["factor"])
        if "beta_fast" in rope:
            kw["rope_beta_fast"] = float(rope["beta_fast"])
        if "beta_slow" in rope:
            kw["rope_beta_slow"] = float(rope["beta_slow"])
        if "truncate" in rope:
            kw["rope_truncate"] = bool(rope["truncate"])
        if rope.get("original_max_position_embeddings") is not None:
            kw["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
        # OpenAI original/ spelling
        take("rope_factor", "rope_scaling_factor", conv=float)
        take("rope_beta_fast", "rope_ntk_beta", conv=float)
        take("rope_beta_slow", "rope_ntk_alpha", conv=float)
        if "max_position_embeddings" not in kw and "rope_factor" in kw:
            base = kw.get("original_max_position_embeddings", cls.original_max_position_embeddings)
            kw["max_position_embeddings"] = int(base * kw["rope_factor"])
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> GptOssConfig:
        path = os.fspath(path)
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read ({e})") from None
        try:
            return cls.from_dict(raw, source=path)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:  # a value of the wrong type deeper in the file
            raise ConfigError(f"{path}: invalid value ({e})") from None

    # -- writing ---------------------------------------------------------------------------
    def to_hf_dict(self, *, quantized: bool = True) -> dict[str, Any]:
        """The released Hugging Face config.json for this config."""
        out = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.9,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "experts_per_token": self.num_experts_per_tok,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "swiglu_limit": self.swiglu_limit,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_factor,
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "truncate": self.rope_truncate,
                "original_max_position_embeddings": self.original_max_position_embeddings,
            },
            "initial_context_length": self.original_max_position_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if quantized:
            out["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            }
        return out

    def to_original_dict(self) -> dict[str, Any]:
        """OpenAI's ``original/config.json`` for this config."""
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_local_experts,
            "experts_per_token": self.num_experts_per_tok,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.original_max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_factor,
            "rope_ntk_alpha": self.rope_beta_slow,
            "rope_ntk_beta": self.rope_beta_fast,
        }


GPT_OSS_20B = GptOssConfig()
GPT_OSS_120B = GptOssConfig(num_hidden_layers=36, num_local_experts=128)

# Tiny test preset: every dimension a different number, so a swapped axis fails loudly.
# (d=96, f=160, n=6 heads over k=2 kv heads -> g=3, h=10, e=7, top-3, window 5, vocab 211.)
TINY = GptOssConfig(
    vocab_size=211, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
    num_attention_heads=6, num_key_value_heads=2, head_dim=10, num_local_experts=7,
    num_experts_per_tok=3, sliding_window=5, rope_theta=1000.0, rope_factor=4.0,
    original_max_position_embeddings=13, max_position_embeddings=52,
    eos_token_id=200, pad_token_id=199,
)

# Benchmark preset from the generation issue: hidden 512, intermediate 512, 8 layers,
# 16 experts top-4, 8 q heads, 2 kv heads, head_dim 64, the real vocabulary, window 128.
BENCH = GptOssConfig(
    hidden_size=512, intermediate_size=512, num_hidden_layers=8, num_local_experts=16,
    num_experts_per_tok=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
)

# Tiny chat preset: the real vocabulary (so o200k_harmony token ids fit) on a tiny body, every
# other dimension distinct (d=64, f=96, n=4 over k=2 -> g=2, h=12, e=5 top-2, window 8, 2 layers;
# h=12 so that n*h=48 differs from d and a transposed q/o projection fails loudly).
TINY_CHAT = GptOssConfig(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=12, num_local_experts=5, num_experts_per_tok=2,
    sliding_window=8,
)

PRESETS = {"gpt-oss-20b": GPT_OSS_20B, "gpt-oss-120b": GPT_OSS_120B, "tiny": TINY,
           "tiny-chat": TINY_CHAT, "bench": BENCH}

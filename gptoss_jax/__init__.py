"""gptoss_jax: OpenAI's gpt-oss in JAX — MXFP4 experts end to end, Pallas kernels, sharding.

Public surface (see shared/DESIGN.md): :func:`load`, :class:`Model`, :class:`GptOssConfig` and
its presets, :func:`generate` / :func:`generate_stream` (``inference``) and the harmony chat
helpers (:mod:`gptoss_jax.harmony`).

Subpackages, lowest layer first: ``model`` (config, parameters, the forward pass), ``ops`` (the
platform-dependent ops the model calls), ``parallel`` (meshes, sharding rules, multi-host),
``checkpoint`` (loading folders and hub ids), ``inference`` (slot engine, sampling, the
generation API), ``chat`` (tokenizer, harmony), ``finetune`` (LoRA training and exports),
``server`` (the OpenAI-compatible API), ``cli`` (the command lines).
"""

from gptoss_jax.checkpoint.load import load
from gptoss_jax.inference.api import Completion, TokenEvent, generate, generate_stream
from gptoss_jax.inference.engine import Engine
from gptoss_jax.inference.sampling import SamplingParams
from gptoss_jax.model.config import GPT_OSS_20B, GPT_OSS_120B, GptOssConfig
from gptoss_jax.model.model import Model

__all__ = ["GPT_OSS_20B", "GPT_OSS_120B", "Completion", "Engine", "GptOssConfig", "Model",
           "SamplingParams", "TokenEvent", "generate", "generate_stream", "load"]

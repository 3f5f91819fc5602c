"""A loaded gpt-oss: the parameter tree with its static config and runtime choices."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from gptoss_jax.model import transformer as M
from gptoss_jax.model.config import GptOssConfig
from gptoss_jax.ops.runtime import resolve


def resolved_runtime() -> M.Runtime:
    """The runtime of a model made without one: the ops resolved for this platform."""
    return M.Runtime(ops=resolve())


@struct.dataclass
class Model:
    """A loaded gpt-oss: parameters (a pytree) plus the static config and runtime choices.

    ``model(tokens)`` -> ``[batch, time, vocab]`` f32 logits for int32 ``[batch, time]`` tokens;
    ``lengths`` (``[batch]``) marks right padding in a batch of unequal length.
    ``model.runtime.ops.table()`` shows which implementation runs each platform-dependent op;
    a model made without a ``runtime`` resolves it (``ops.resolve()``) when it is made.
    """
    params: dict
    config: GptOssConfig = struct.field(pytree_node=False)
    runtime: M.Runtime = struct.field(pytree_node=False, default_factory=resolved_runtime)
    path: str = struct.field(pytree_node=False, default="")

    def __call__(self, tokens, lengths=None) -> jax.Array:
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        return _forward(self.params, tokens, None if lengths is None else jnp.asarray(lengths),
                        self.config, self.runtime)

    @property
    def dtype(self):
        return self.params["embed"].dtype

    def with_runtime(self, **changes) -> Model:
        """This model with ``Runtime`` fields replaced (e.g. ``ops=ops.resolve(experts="xla")``)."""
        return self.replace(runtime=dataclasses.replace(self.runtime, **changes))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _forward(params, tokens, lengths, config, runtime):
    return M.forward(params, tokens, config, lengths=lengths, rt=runtime)

"""Harmony chat helpers, the public name (``from gptoss_jax import harmony``): rendering
conversations to prompt tokens and parsing replies into channels and tool calls. The code lives
in :mod:`gptoss_jax.chat`."""

from gptoss_jax.chat.harmony import *  # noqa: F403
from gptoss_jax.chat.harmony import CALL, END, ENDOFTEXT, MESSAGE, RETURN, ROLES, START, harmony_encoding  # noqa: F401

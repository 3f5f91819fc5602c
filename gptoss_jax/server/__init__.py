"""OpenAI-compatible HTTP server for gpt-oss (``python -m gptoss_jax.serve``).

* :mod:`.app` — ``create_app``: state, error handlers, API key (:mod:`.auth`), routers.
* Endpoints, one module per family: :mod:`.responses` (with :mod:`.response_output`: the
  response object and its stream events), :mod:`.chat_completions`, :mod:`.completions`,
  :mod:`.models` (models, health, stats).
* Shared by the endpoints: :mod:`.params` (request parameters), :mod:`.inputs` (input items and
  messages -> harmony conversation -> prompt), :mod:`.schemas` (request bodies), :mod:`.reply`
  (generated harmony tokens -> output items), :mod:`.generation` (job -> consumer, plain or
  streamed), :mod:`.errors` (OpenAI's error object), :mod:`.state`, :mod:`.store` (stored
  responses).
* :mod:`.scheduler` — one thread owns the slot engine; continuous batching between decode steps.
* :mod:`.background` — listening sockets, and a server thread for tests and notebooks.
"""

from gptoss_jax.server.app import create_app
from gptoss_jax.server.scheduler import Scheduler

__all__ = ["Scheduler", "create_app"]

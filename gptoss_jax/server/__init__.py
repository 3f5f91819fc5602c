"""OpenAI-compatible HTTP server for gpt-oss (``python -m gptoss_jax.serve``).

* :mod:`.app` — ``create_app``: state, error handlers, API key (:mod:`.auth`), routers,
  :mod:`.openapi` (every status code in ``/openapi.json``).
* Endpoints, one module per family: :mod:`.responses` (with :mod:`.response_output`: the
  response object and its stream events; :mod:`.background_responses`), :mod:`.response_routes`
  (retrieve, delete, input items, cancel), :mod:`.chat_completions`, :mod:`.completions`,
  :mod:`.models` (models, health, stats).
* Shared by the endpoints: :mod:`.params` (request parameters), :mod:`.request_sampling`
  (sampling, ``n``, ``stop``, logprobs), :mod:`.inputs` (input items and messages -> harmony
  conversation -> prompt), :mod:`.schemas` (request bodies), :mod:`.reply` (generated harmony
  tokens -> output items), :mod:`.choices` (a completion choice: stop strings, logprobs),
  :mod:`.generation` (job -> consumer, plain or streamed), :mod:`.errors` (OpenAI's error
  object), :mod:`.state`; stored responses in :mod:`.response_store` (memory) or
  :mod:`.sqlite_store` (``--store PATH``), records as :mod:`.stored` writes them.
* :mod:`.scheduler` — one thread owns the slot engine; continuous batching between decode steps.
* :mod:`.background` — listening sockets, and a server thread for tests and notebooks.
"""

from gptoss_jax.server.app import create_app
from gptoss_jax.server.scheduler import Scheduler

__all__ = ["Scheduler", "create_app"]

"""Stored responses: ``GET`` / ``DELETE /v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``
and ``POST /v1/responses/{id}/cancel``, as OpenAI's API reference defines them.

* ``GET`` returns the response object as stored (a background response's status while it runs);
  with ``stream=true`` it streams the events of a background response after ``starting_after``
  (its sequence numbers), following it until it ends (a response created without
  ``background`` kept no events: 400).
* ``DELETE`` removes the response with its input items (a running background one is stopped
  first) and answers ``{"id", "object": "response", "deleted": true}``.
* ``input_items`` pages through the request's input items: ``after`` / ``before`` (item ids),
  ``limit`` 1-100 (default 20), ``order`` ``desc`` (default) or ``asc``.
* ``cancel``: :func:`gptoss_jax.server.background_responses.cancel`.

An unknown id (never stored, deleted, or created with ``store: false``) is a 404 naming
``response_id``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request

from gptoss_jax.server import background_responses
from gptoss_jax.server.background_responses import not_found, stored_events
from gptoss_jax.server.errors import APIError
from gptoss_jax.server.generation import SSEResponse
from gptoss_jax.server.openapi import STREAMING, errors
from gptoss_jax.server.response_store import DEFAULT_LIMIT, MAX_LIMIT, StoreError
from gptoss_jax.server.state import state

router = APIRouter()


@router.get("/v1/responses/{response_id}", responses={**STREAMING, **errors(400, 404)})
async def get_response(request: Request, response_id: str, stream: bool = False,
                       starting_after: int | None = None,
                       include: Annotated[list[str] | None, Query()] = None):
    st = state(request)
    record = st.store.get(response_id)
    if record is None:
        raise not_found(response_id)
    if not stream:
        return record.response
    if not record.background:
        raise APIError("Only responses created with background=true can be streamed again; this one "
                       "kept no events", param="stream", code="invalid_value")
    return SSEResponse(stored_events(st, response_id, starting_after), on_close=lambda: None)


@router.delete("/v1/responses/{response_id}", responses=errors(404))
async def delete_response(request: Request, response_id: str):
    await background_responses.delete(state(request), response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items", responses=errors(400, 404))
async def input_items(request: Request, response_id: str, after: str | None = None, before: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
                      order: Literal["asc", "desc"] = "desc",
                      include: Annotated[list[str] | None, Query()] = None):
    try:
        page = state(request).store.input_items(response_id, after=after, before=before, limit=limit, order=order)
    except StoreError as e:
        raise APIError(str(e), param=e.param, code="invalid_value") from None
    if page is None:
        raise not_found(response_id)
    return page.json()


@router.post("/v1/responses/{response_id}/cancel", responses=errors(400, 404))
async def cancel_response(request: Request, response_id: str):
    return await background_responses.cancel(state(request), response_id)

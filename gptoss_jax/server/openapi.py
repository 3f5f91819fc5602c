"""``/openapi.json``: every status code a route answers, each error with OpenAI's error object.

Routes declare their error codes with ``responses=errors(400, 404, ...)``; :func:`install`
then finishes the schema FastAPI generates: FastAPI's own 422 entries go (this server answers a
malformed body with a 400, see ``server.errors``), 401 joins every route when the server needs an
API key, and streaming routes list ``text/event-stream`` beside ``application/json``. So a
schema-driven client or fuzzer meets no status code the schema does not name.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

_DESCRIPTIONS = {
    400: "Invalid request: OpenAI's error object, `param` names the offending field",
    401: "Missing or incorrect API key",
    404: "Unknown model, response or input item",
    409: "The previous response is still running (continue it once it has finished)",
    500: "Generation failed inside the engine",
    503: "The model is not available (the generation thread is not running, or still starting)",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error object."""
    error: ErrorDetail


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route that answers these error codes."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in codes}


STREAMING = {200: {"description": "The object, or server-sent events when `stream` is true",
                   "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}}}


def _finish(schema: dict, api_key: bool) -> dict:
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in schema.get("paths", {}).values():
        for op in path.values():
            answers = op.setdefault("responses", {})
            answers.pop("422", None)
            if api_key:
                answers["401"] = {"description": _DESCRIPTIONS[401],
                                  "content": {"application/json": {"schema": error_ref}}}
    parts = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        parts.pop(name, None)
    return schema


def install(app: FastAPI, *, api_key: bool) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            app.openapi_schema = _finish(schema, api_key)
        return app.openapi_schema

    app.openapi = openapi

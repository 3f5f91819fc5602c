"""OpenAI's error object, and the handlers that turn every failure into one.

Every error the server returns has the shape the official clients parse::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Client mistakes are 4xx ``invalid_request_error`` s (``param`` names the offending field, with
list indices: ``input[2].content``; ``code`` as OpenAI's API gives it for a field of the wrong
type or out of range: ``invalid_type``, ``integer_above_max_value``...); anything unexpected is a
500 ``server_error`` whose message
hides the traceback (it goes to the log); an engine that is not running is a 503.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptoss_jax.server.scheduler import EngineError

log = logging.getLogger("gptoss_jax.server")


class APIError(Exception):
    """An error to report to the client as OpenAI's error object."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def unsupported(param: str, what: str | None = None) -> APIError:
    return APIError(what or f"{param!r} is not supported by this server", param=param,
                    code="unsupported_parameter")


_UNION_TAG = re.compile(r"(str|int|float|bool|list\[.*\]|dict\[.*\]|[\w-]*-[\w-]*\[?.*)")


def param_path(loc) -> str | None:
    """``("body", "input", 2, "content")`` -> ``input[2].content``."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path", "header") and not out:
            continue
        if isinstance(part, str) and _UNION_TAG.fullmatch(part):
            continue  # pydantic names the union member it tried: not part of the path
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or None


# pydantic's bound errors -> (which side, the ctx key of the bound)
_BOUNDS = {"greater_than_equal": ("below_min", "ge", ">="), "greater_than": ("below_min", "gt", ">"),
           "less_than_equal": ("above_max", "le", "<="), "less_than": ("above_max", "lt", "<")}


def _field_error(param: str, error: dict) -> APIError:
    """One field's validation error, with the ``code`` OpenAI's API gives it: ``invalid_type``
    (a string where a number belongs...), ``integer_below_min_value`` /
    ``decimal_above_max_value`` ... (a number out of range), ``string_above_max_length``, else
    ``invalid_value`` (a value not among those allowed)."""
    kind, ctx, given = error.get("type", ""), error.get("ctx") or {}, error.get("input")
    if kind in _BOUNDS:
        side, key, op = _BOUNDS[kind]
        bound = ctx.get(key)
        number = "decimal" if isinstance(bound, float) else "integer"  # the field's type, as the bound's
        shown = f"{bound:g}" if isinstance(bound, float) else bound
        return APIError(f"Invalid {param!r}: {number} {side.replace('_', ' ')}imum value. Expected a value "
                        f"{op} {shown}, but got {given!r} instead.", param=param, code=f"{number}_{side}_value")
    if kind == "string_too_long":
        return APIError(f"Invalid {param!r}: string too long. Expected a string with maximum length "
                        f"{ctx.get('max_length')}, but got a string with length {len(str(given))} instead.",
                        param=param, code="string_above_max_length")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "int_from_float":
        return APIError(f"Invalid type for {param!r}: {error.get('msg', 'wrong type')}", param=param,
                        code="invalid_type")
    return APIError(f"Invalid value for {param!r}: {error.get('msg', 'invalid')}", param=param,
                    code="invalid_value")


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError("The request body is not valid JSON: "
                        f"{first.get('ctx', {}).get('error', first.get('msg', ''))}",
                        code="invalid_json").response()
    param = param_path(first.get("loc", ()))
    if first.get("type") == "missing":
        message = f"Missing required parameter: {param!r}"
    elif param is None:
        ctype = request.headers.get("content-type", "")
        hint = "" if "json" in ctype else f" (send it as Content-Type: application/json, not {ctype or 'nothing'})"
        message = f"The request body must be a JSON object{hint}"
    else:
        return _field_error(param, first).response()
    return APIError(message, param=param, code="invalid_value" if first.get("type") != "missing"
                    else "missing_required_parameter").response()


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {401: "invalid_request_error", 404: "invalid_request_error",
            405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"Unknown URL {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    return APIError(message, status=exc.status_code, type=kind).response()


def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


def _engine_unavailable(request: Request, exc: EngineError) -> JSONResponse:
    return APIError(f"The model is unavailable: {exc}", status=503, type="server_error",
                    code="service_unavailable").response()


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return APIError("The server had an error while processing your request.", status=500,
                    type="server_error", code="server_error").response()


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(EngineError, _engine_unavailable)
    app.add_exception_handler(Exception, _unexpected)

"""Bearer API-key check for every route."""

from __future__ import annotations

import hmac

from gptoss_jax.server.errors import APIError


class APIKeyMiddleware:
    """``Authorization: Bearer <key>`` on every route (plain ASGI: streaming passes through
    untouched, disconnects included)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, (api_key or "").encode()

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http":
            auth = dict(scope.get("headers") or ()).get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                message = ("Missing API key: pass it as 'Authorization: Bearer <key>'" if not auth
                           else "Incorrect API key provided")
                response = APIError(message, status=401, code="invalid_api_key").response()
                return await response(scope, receive, send)
        await self.app(scope, receive, send)

"""`--api-key`: every route but `/health` needs `Authorization: Bearer KEY` (OpenAI clients, curl) or
`x-api-key: KEY` (Anthropic clients). A missing or wrong key is a 401 before the route runs. Keys are
compared in constant time.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which wraps the request's receive channel so
that a route can no longer see its client disconnect)."""

from __future__ import annotations

import hmac

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from shoal.api.errors import error_response

OPEN_PATHS = frozenset({"/health"})


def presented_key(headers: Headers) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key")


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        key = presented_key(Headers(scope=scope))
        if key is not None and hmac.compare_digest(key.encode(), self.expected):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401,
            "authentication_error",
            "missing or wrong API key: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


def require_api_key(app: FastAPI, api_key: str) -> None:
    app.add_middleware(ApiKeyMiddleware, api_key=api_key)

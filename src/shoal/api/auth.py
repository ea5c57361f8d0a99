"""`--api-key`: every route but `/health` needs `Authorization: Bearer KEY` (OpenAI clients, curl) or
`x-api-key: KEY` (Anthropic clients). A missing or wrong key is a 401 before the route runs. Keys are
compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from shoal.api.errors import error_response

OPEN_PATHS = frozenset({"/health"})


def presented_key(request: Request) -> str | None:
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


def require_api_key(app: FastAPI, api_key: str) -> None:
    expected = api_key.encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        key = presented_key(request)
        if key is None or not hmac.compare_digest(key.encode(), expected):
            return error_response(
                401,
                "authentication_error",
                "missing or wrong API key: send Authorization: Bearer <key>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)

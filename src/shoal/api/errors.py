"""The node API's one error shape: {"error": {"type": ..., "message": ..., ...}}, and its OpenAPI
documentation (`documented(...)`), so the spec lists every status a route can answer with."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "param", "command_id"

    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


STATUS_TEXT = {
    400: "Invalid request (the field and the reason)",
    401: "Missing or wrong API key",
    404: "Not found",
    405: "Method not allowed",
    409: "Refused by the cluster (the reason)",
    422: "Invalid request body or parameters",
    500: "The task failed on its runner",
    503: "Not available now: no master answered, or the model is loading (see Retry-After)",
    504: "Accepted by the master but not yet replicated to this node",
}
# Every route may answer these: the API key check, a path that matches no route (a path parameter the
# router cannot take, e.g. one with a newline), and request validation.
COMMON_ERRORS = (401, 404, 422)


def documented(*statuses: int, model: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, all with the `model` body."""
    return {status: {"model": model, "description": STATUS_TEXT[status]} for status in statuses}


SSE_EVENT_SCHEMA = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}},
}
NDJSON_LINE_SCHEMA = {"type": "object"}


def streamed(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entry for a 200 that streams `media_type` (SSE events, NDJSON lines, text)."""
    schema = {"text/event-stream": SSE_EVENT_SCHEMA, "application/x-ndjson": NDJSON_LINE_SCHEMA}.get(
        media_type, {"type": "string"}
    )
    return {200: {"description": description, "content": {media_type: {"schema": schema}}}}


def error_response(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"type": kind, "message": message, **extra}}, headers=headers
    )


def invalid_response(error: ValidationError | RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
    return error_response(422, "invalid_request", problems)

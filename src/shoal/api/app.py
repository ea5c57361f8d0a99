"""Control routes of the node's HTTP API.

GET /health (never needs the API key; 503 with status "identity_clash" while the node is silenced by a clashing id), GET /state (replicated State + this node's `diagnostics`), GET /nodes, GET /events (SSE of
indexed events, optionally replaying from `from_index`; with `follow=false` it ends after the backlog), POST /nodes/{node_id}/labels and
DELETE /nodes/{node_id}/labels/{key} (commands submitted through the master; the answer is the master's:
200 with the indices, 409 with its rejection reason, or 503 when no master answered before the deadline).
GET /metrics (Prometheus, see `shoal.api.metrics`). Instances and models: see `shoal.api.instances`; downloads: `shoal.api.downloads`; generation:
`shoal.api.generate`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoal.api.anthropic import add_anthropic_routes
from shoal.api.auth import require_api_key
from shoal.api.downloads import add_download_routes
from shoal.api.errors import COMMON_ERRORS, documented, error_response, invalid_response, streamed
from shoal.api.generate import add_generate_route
from shoal.api.instances import add_instance_routes
from shoal.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from shoal.api.metrics import ApiMetrics
from shoal.api.ollama import add_ollama_routes
from shoal.api.openai import add_openai_routes
from shoal.api.service import GenerationService
from shoal.task_router import TaskRouter
from shoal.types import (
    INDEXED_EVENT_ADAPTER,
    Command,
    CommandAccepted,
    CommandRejected,
    IndexedEvent,
    NodeId,
    RemoveNodeLabel,
    SetNodeLabel,
    State,
)
from shoal.worker.downloads import Downloader

SSE_KEEPALIVE_S = 10.0
BACKLOG_CHUNK = 500


class ClusterNode(Protocol):
    """What the API needs from the node that serves it."""

    @property
    def state(self) -> State: ...

    def diagnostics(self) -> dict[str, Any]: ...

    async def submit(self, command: Command) -> CommandAccepted | CommandRejected | None: ...

    def read_events(self, first: int, last: int) -> Sequence[IndexedEvent]: ...

    def listen_events(self) -> MemoryObjectReceiveStream[IndexedEvent]: ...

    @property
    def models_dir(self) -> Path: ...

    @property
    def router(self) -> TaskRouter: ...

    @property
    def downloader(self) -> Downloader: ...


class HealthBody(BaseModel):
    status: str
    node_id: str
    role: str
    master: str | None
    last_index: int


class LabelBody(BaseModel):
    key: str
    value: str


def _sse(event: IndexedEvent) -> bytes:
    data = INDEXED_EVENT_ADAPTER.dump_json(event).decode()
    return f"id: {event.index}\nevent: {event.event.kind}\ndata: {data}\n\n".encode()


def create_app(node: ClusterNode, command_timeout_s: float, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="shoal node", docs_url=None, redoc_url=None, responses=documented(*COMMON_ERRORS))
    metrics = ApiMetrics(lambda: node.state, lambda: node.diagnostics().get("worker", {}).get("runners", {}))
    service = GenerationService(node, metrics)
    if api_key:
        require_api_key(app, api_key)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # routing's own answers (no such path, wrong method) in the same shape as every other error
        kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return error_response(
            error.status_code, kind, str(error.detail), headers=dict(error.headers) if error.headers else None
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        # the same error shape as every other answer, not FastAPI's {"detail": [...]}
        return invalid_response(error)

    async def answer(command: Command) -> JSONResponse:
        reply = await node.submit(command)
        if reply is None:
            return error_response(
                503,
                "no_master",
                f"no master answered within {command_timeout_s:g} s; the cluster may be electing",
            )
        if isinstance(reply, CommandRejected):
            return error_response(409, "command_rejected", reply.reason, command_id=reply.command_id)
        return JSONResponse(reply.model_dump(mode="json"))

    @app.get("/health", response_model=None, responses=documented(503, model=HealthBody))
    async def health() -> JSONResponse:
        diagnostics = node.diagnostics()
        clash = diagnostics["identity_clash"] is not None and diagnostics["role"] == "quarantined"
        body = {
            "status": "identity_clash" if clash else "ok",
            "node_id": diagnostics["node_id"],
            "role": diagnostics["role"],
            "master": diagnostics["master"],
            "last_index": node.state.last_index,
        }
        # A node that found its id in use by another process stays silent: not healthy, and says why.
        return JSONResponse(body, status_code=503 if clash else 200)

    @app.get("/state")
    async def state() -> dict[str, Any]:
        return {**node.state.model_dump(mode="json"), "diagnostics": node.diagnostics()}

    @app.get("/nodes")
    async def nodes() -> dict[str, Any]:
        records = node.state.model_dump(mode="json")["nodes"]
        return {"nodes": [{"node_id": node_id, **record} for node_id, record in sorted(records.items())]}

    @app.post("/nodes/{node_id}/labels", response_model=None, responses=documented(409, 503))
    async def set_label(node_id: str, body: LabelBody) -> JSONResponse:
        try:
            command = SetNodeLabel(node_id=NodeId(node_id), key=body.key, value=body.value)
        except ValidationError as error:
            return invalid_response(error)
        return await answer(command)

    @app.delete("/nodes/{node_id}/labels/{key:path}", response_model=None, responses=documented(409, 503))
    async def remove_label(node_id: str, key: str) -> JSONResponse:
        try:
            command = RemoveNodeLabel(node_id=NodeId(node_id), key=key)
        except ValidationError as error:
            return invalid_response(error)
        return await answer(command)

    @app.get("/events", response_model=None, responses=streamed("text/event-stream", "Indexed events (SSE)"))
    async def events(
        from_index: int | None = Query(default=None, ge=1), follow: bool = True
    ) -> StreamingResponse:
        live = node.listen_events()  # listen before reading the backlog, so nothing falls in between

        async def stream() -> AsyncIterator[bytes]:
            with live:
                sent = node.state.last_index if from_index is None else from_index - 1
                while from_index is not None:
                    backlog = node.read_events(sent + 1, sent + BACKLOG_CHUNK)
                    if not backlog:
                        break
                    for event in backlog:
                        yield _sse(event)
                    sent = backlog[-1].index
                while follow:
                    with anyio.move_on_after(SSE_KEEPALIVE_S) as scope:
                        try:
                            event = await live.receive()
                        except anyio.EndOfStream:
                            return
                    if scope.cancelled_caught:
                        yield b": keepalive\n\n"
                        continue
                    if event.index > sent:
                        sent = event.index
                        yield _sse(event)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get(
        "/metrics",
        response_model=None,
        responses=streamed(METRICS_CONTENT_TYPE.split(";")[0], "Prometheus text format"),
    )
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    add_instance_routes(app, node, command_timeout_s)
    add_generate_route(app, service)
    add_download_routes(app, node)
    # public API routes
    add_openai_routes(app, service)
    add_anthropic_routes(app, service)
    add_ollama_routes(app, service)
    return app

"""What the public APIs (OpenAI, Anthropic, Ollama, /generate) share: open a generation task on an
instance of the requested model and follow it to its end.

Inputs: a `GenerationRequest` (model name, prompt, wire sampling params, tools). `GenerationService.open`
checks the params with the engine's own rules and picks an instance; it raises `ApiProblem` (400 invalid
field, 404 no such model, 503 + Retry-After while one is loading) before anything is sent, so each API can
shape the error its own way. The returned `Generation` yields the task's chunks (and None keep-alive ticks
while nothing arrives, for SSE comments), accumulates the text, tokens, logprobs and usage, and records
the request in the metrics. Closing it before the end cancels the task on its runner.

Invariant: a Generation always ends — the router's first-chunk deadline and instance checks see to it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from shoal.api.metrics import ApiMetrics
from shoal.engine.errors import InvalidRequestError
from shoal.engine.sampling import SamplingParams
from shoal.routing import NoInstance, pick_instance
from shoal.task_router import TaskRouter
from shoal.types import State
from shoal.types.generation import (
    ErrorKind,
    GenerationChunk,
    GenerationParams,
    Prompt,
    TokenLogprobs,
    ToolSpec,
)
from shoal.types.instance_ids import InstanceId
from shoal.types.instances import Instance

RETRY_AFTER_S = 2
KEEPALIVE_S = 5.0
DISCONNECT_CHECK_S = 0.5


class ServiceNode(Protocol):
    @property
    def state(self) -> State: ...

    @property
    def router(self) -> TaskRouter: ...


@dataclass(frozen=True, slots=True)
class ApiProblem(Exception):
    """A request the node cannot serve, before anything ran: the status and a reason for the caller."""

    status: int
    kind: str  # invalid_request | model_not_found | model_loading
    message: str
    param: str | None = None
    retry_after_s: int | None = None

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str
    prompt: Prompt
    params: GenerationParams
    tools: tuple[ToolSpec, ...] = ()
    instance_id: str | None = None


def generation_params(fields: dict[str, Any]) -> GenerationParams:
    """Wire sampling params from an API's fields (names as GenerationParams has them), checked by the
    engine's own rules; ApiProblem(400) naming the field otherwise."""
    try:
        params = GenerationParams.model_validate(fields, strict=False)
        SamplingParams(**params.model_dump())
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiProblem(400, "invalid_request", f"{param}: {first['msg']}", param=param) from None
    except InvalidRequestError as error:
        raise ApiProblem(400, "invalid_request", str(error), param=error.field) from None
    return params


@dataclass(slots=True)
class Generation:
    """One task, followed to its end. Iterate it once; its fields hold what arrived so far."""

    instance: Instance
    api: str
    model: str
    _chunks: AsyncGenerator[GenerationChunk | None, None]
    _metrics: ApiMetrics
    # Whether the HTTP client has gone: checked on the way (at most every DISCONNECT_CHECK_S, and on every
    # keep-alive tick), so a client that leaves a non-streamed request cancels it too.
    _disconnected: Callable[[], Awaitable[bool]] | None = None
    _checked_at: float = 0.0
    left: bool = False
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    _started: float = field(default_factory=time.perf_counter)
    _first_token_at: float | None = None
    _last_token_at: float | None = None
    _closed: bool = False

    async def __aiter__(self) -> AsyncIterator[GenerationChunk | None]:
        try:
            async for chunk in self._chunks:
                if chunk is not None:
                    self._take(chunk)
                if await self._client_left(chunk is None):
                    self.left = True
                    return
                yield chunk
        finally:
            await self.aclose()

    async def _client_left(self, tick: bool) -> bool:
        if self._disconnected is None:
            return False
        now = time.monotonic()
        if not tick and now - self._checked_at < DISCONNECT_CHECK_S:
            return False
        self._checked_at = now
        return await self._disconnected()

    async def collect(self) -> Generation:
        """Run the task to its end (non-streaming answers)."""
        async for _ in self:
            pass
        return self

    def failure(self) -> ApiProblem | None:
        """Why the task did not finish, as an answer for a caller that has not seen any of it: 400 when
        the runner refused the request itself (e.g. longer than the context), 503 when no instance could
        go on with it, 500 when a runner broke or the task was aborted. None when it finished."""
        if self.error is None and self.finish_reason not in (None, "abort"):
            return None
        message = self.error or "the generation was aborted before it finished"
        if self.error_kind == "invalid_request":
            return ApiProblem(400, "invalid_request", message)
        if self.error_kind == "unavailable":
            return ApiProblem(503, "unavailable", message, retry_after_s=RETRY_AFTER_S)
        return ApiProblem(500, "server_error", message)

    async def aclose(self) -> None:
        """End the task (cancelling it on its runner if it is still going) and record it, once."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._chunks.aclose()
        finally:
            outcome = (
                "cancelled" if self.left else (self.error and "error") or self.finish_reason or "cancelled"
            )
            decode_s = None
            if self._first_token_at is not None and self._last_token_at is not None:
                decode_s = self._last_token_at - self._first_token_at
            self._metrics.request_ended(
                self.api,
                self.model,
                outcome,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                decode_s=decode_s,
            )

    def _take(self, chunk: GenerationChunk) -> None:
        now = time.perf_counter()
        if chunk.token_ids:
            if self._first_token_at is None:
                self._first_token_at = now
                self._metrics.first_token(self.api, self.model, now - self._started)
            self._last_token_at = now
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        if chunk.error is not None:
            self.error = chunk.error
            self.error_kind = chunk.error_kind or "server_error"
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.prompt_tokens is not None:
            self.prompt_tokens = chunk.prompt_tokens
        if chunk.cached_tokens is not None:
            self.cached_tokens = chunk.cached_tokens
        self.completion_tokens = (
            chunk.completion_tokens if chunk.completion_tokens is not None else len(self.token_ids)
        )


class GenerationService:
    def __init__(self, node: ServiceNode, metrics: ApiMetrics, keepalive_s: float = KEEPALIVE_S) -> None:
        self.node = node
        self.metrics = metrics
        self.keepalive_s = keepalive_s

    def open(
        self,
        request: GenerationRequest,
        api: str,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> Generation:
        """Start the task on the least busy ready instance of the model; ApiProblem when none can serve.
        `disconnected` (the HTTP request's `is_disconnected`) lets a client that leaves cancel the task."""
        if isinstance(request.prompt, tuple) and not request.prompt:
            raise ApiProblem(400, "invalid_request", "the prompt is empty", param="prompt")
        if request.tools and isinstance(request.prompt, str):
            raise ApiProblem(400, "invalid_request", "tools need a chat prompt", param="tools")
        router = self.node.router
        pinned = InstanceId(request.instance_id) if request.instance_id is not None else None
        chosen = pick_instance(self.node.state, request.model, router.in_flight, pinned)
        if isinstance(chosen, NoInstance):
            self.metrics.request_refused(api, request.model, "loading" if chosen.loading else "not_found")
            if chosen.loading:
                raise ApiProblem(503, "model_loading", chosen.reason, retry_after_s=RETRY_AFTER_S)
            raise ApiProblem(404, "model_not_found", chosen.reason, param="model")
        chunks = router.generate(
            chosen, request.prompt, request.params, request.tools, keepalive_s=self.keepalive_s
        )
        self.metrics.request_started(api, request.model)
        return Generation(
            instance=chosen,
            api=api,
            model=request.model,
            _chunks=chunks,
            _metrics=self.metrics,
            _disconnected=disconnected,
        )

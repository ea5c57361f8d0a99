"""The OpenAI-compatible API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}].

Inputs: OpenAI request bodies (`openai_models`), turned into a GenerationRequest (`openai_requests`) and
run through the shared `GenerationService`. Outputs: `chat.completion` / `text_completion` objects, or with
`stream` an SSE stream of chunks (`openai_shaping`) ending with `data: [DONE]`; `: keep-alive` comments
while nothing arrives. Errors in OpenAI's shape ({"error": {message, type, param, code}}): 400 invalid
field (body errors too: never FastAPI's 422), 404 unknown model (code model_not_found), 503 + Retry-After
while it loads, 500 for a task that failed in a non-streamed answer; inside a started stream an error event
`data: {"error": {...}}` and then `[DONE]`. A client that leaves mid-stream cancels its task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel

from shoal.api.openai_models import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelList,
    ModelObject,
    Usage,
)
from shoal.api.openai_requests import chat_plan, completion_plan
from shoal.api.openai_shaping import (
    ChatStream,
    CompletionStream,
    chat_completion,
    completion,
    error_body,
    error_response,
    generation_failed,
    new_id,
    problem_response,
    usage,
)
from shoal.api.service import ApiProblem, Generation, GenerationRequest, GenerationService
from shoal.engine.embedded import EMBEDDED_MODEL_NAME
from shoal.models import DEFAULT_MODEL, matches
from shoal.types import State

log = logging.getLogger(__name__)

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 500, 503)
}
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _answers(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI: a JSON object, or an SSE stream with `stream: true`; errors in OpenAI's shape."""
    stream = {"text/event-stream": {"schema": {"type": "string"}}}
    return {200: {"model": model, "content": stream}, **_ERRORS}


class OpenAIRoute(APIRoute):
    """Body validation errors become OpenAI's 400 naming the field, instead of the app's 422."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as error:
                return invalid_body(error)

        return handle


def invalid_body(error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return error_response(400, "the body is not valid JSON", "invalid_request_error")
    param = error_param(tuple(first.get("loc", ())))
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return error_response(400, message, "invalid_request_error", param)


def error_param(loc: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "content", "str") -> "messages.[0].content" (OpenAI's spelling): the
    union branch pydantic appends is not part of the field's name."""
    parts: list[str] = []
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif not part.isidentifier() or part in _TYPE_NAMES or part[:1].isupper():
            break
        else:
            parts.append(part)
    return ".".join(parts) or None


def served_models(state: State, created: int) -> list[ModelObject]:
    """Models with an instance placed (serving or loading), and "default" when the embedded one is."""
    found: dict[str, ModelObject] = {}
    for _, instance in sorted(state.instances.items()):
        model_id = instance.card.model_id
        found.setdefault(model_id, ModelObject(id=model_id, created=created))
        if model_id == EMBEDDED_MODEL_NAME:
            found.setdefault(DEFAULT_MODEL, ModelObject(id=DEFAULT_MODEL, created=created))
    return list(found.values())


def check_token_ids(state: State, request: GenerationRequest) -> None:
    """Token ids beyond the model's vocabulary are the caller's mistake: a 400 here, rather than a task
    that fails on the runner (whose error the API could only pass on as a 500)."""
    if isinstance(request.prompt, str) or not request.prompt:
        return
    vocab_sizes = [i.card.vocab_size for i in state.instances.values() if matches(request.model, i.card)]
    token_ids = [token_id for token_id in request.prompt if isinstance(token_id, int)]
    if vocab_sizes and token_ids and max(token_ids) >= min(vocab_sizes):
        raise ApiProblem(
            400,
            "invalid_request",
            f"prompt token ids must be below the vocabulary size {min(vocab_sizes)}, got {max(token_ids)}",
            param="prompt",
        )


def _sse(item: BaseModel) -> bytes:
    return b"data: " + item.model_dump_json().encode() + b"\n\n"


async def sse_events(generation: Generation, stream: ChatStream | CompletionStream) -> AsyncIterator[bytes]:
    """The stream of one task; it always ends with [DONE], after an error event when the task failed."""
    try:
        for item in stream.start():
            yield _sse(item)
        ended = False
        async for chunk in generation:
            if chunk is None:
                yield KEEPALIVE
                continue
            for item in stream.feed(chunk):
                yield _sse(item)
            if chunk.error is not None:
                kind = "invalid_request_error" if chunk.error_kind == "invalid_request" else "server_error"
                yield _sse(error_body(f"generation failed: {chunk.error}", kind))
                ended = True
                break
            if chunk.finish_reason is not None:
                answer_usage = usage(
                    generation.prompt_tokens, generation.completion_tokens, generation.cached_tokens
                )
                for item in stream.finish(chunk.finish_reason, answer_usage):
                    yield _sse(item)
                ended = True
                break
        if not ended:
            yield _sse(error_body("the generation ended without finishing", "server_error"))
    except Exception as error:
        # The top of this request's stream: whatever broke reaches the client as an error event.
        log.exception("OpenAI stream on instance %s failed", generation.instance.instance_id)
        yield _sse(error_body(f"{type(error).__name__}: {error}", "server_error"))
    finally:
        with anyio.CancelScope(shield=True):
            await generation.aclose()  # a client that left: the router cancels the task on its runner
    yield DONE


def _streaming(generation: Generation, stream: ChatStream | CompletionStream) -> StreamingResponse:
    return StreamingResponse(
        sse_events(generation, stream),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Shoal-Instance": generation.instance.instance_id},
    )


async def _collect(generation: Generation) -> str | JSONResponse:
    """Run a non-streamed answer to its end: its finish reason, or the error answer when it failed."""
    try:
        await generation.collect()
    except Exception as error:
        # The top of this request: whatever broke becomes an answer the client can read.
        log.exception("OpenAI request on instance %s failed", generation.instance.instance_id)
        return generation_failed(f"{type(error).__name__}: {error}")
    failure = generation.failure()
    if failure is not None:
        return problem_response(failure)
    if generation.finish_reason is None:
        return generation_failed("the generation ended without finishing")
    return generation.finish_reason


async def _answer(generation: Generation, build: Callable[[str], BaseModel]) -> Response:
    """A non-streamed answer: `build(finish_reason)` once the task finished, or the error answer."""
    finish_reason = await _collect(generation)
    if isinstance(finish_reason, JSONResponse):
        return finish_reason
    return JSONResponse(build(finish_reason).model_dump(mode="json"))


def _usage(generation: Generation) -> Usage:
    return usage(generation.prompt_tokens, generation.completion_tokens, generation.cached_tokens)


def add_openai_routes(app: FastAPI, service: GenerationService) -> None:
    router = APIRouter(route_class=OpenAIRoute, tags=["openai"])
    listed_at = int(time.time())

    @router.post("/v1/chat/completions", response_model=None, responses=_answers(ChatCompletion))
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Response:
        try:
            plan = chat_plan(body)
            generation = service.open(plan.request, api="openai", disconnected=http.is_disconnected)
        except ApiProblem as problem:
            return problem_response(problem)
        completion_id, created = new_id("chatcmpl"), int(time.time())
        if plan.stream:
            stream = ChatStream(
                completion_id, created, body.model, plan.parse_tools, plan.logprobs, plan.include_usage
            )
            return _streaming(generation, stream)
        return await _answer(
            generation,
            lambda finish_reason: chat_completion(
                completion_id,
                created,
                body.model,
                generation.text,
                generation.logprobs if plan.logprobs else None,
                finish_reason,
                _usage(generation),
                plan.parse_tools,
            ),
        )

    @router.post("/v1/completions", response_model=None, responses=_answers(Completion))
    async def completions(body: CompletionRequest, http: Request) -> Response:
        try:
            plan = completion_plan(body)
            check_token_ids(service.node.state, plan.request)
            generation = service.open(plan.request, api="openai", disconnected=http.is_disconnected)
        except ApiProblem as problem:
            return problem_response(problem)
        completion_id, created = new_id("cmpl"), int(time.time())
        if plan.stream:
            stream = CompletionStream(
                completion_id, created, body.model, plan.logprobs, plan.include_usage, plan.echo
            )
            return _streaming(generation, stream)
        return await _answer(
            generation,
            lambda finish_reason: completion(
                completion_id,
                created,
                body.model,
                generation.text,
                generation.logprobs if plan.logprobs else None,
                finish_reason,
                _usage(generation),
                plan.echo,
            ),
        )

    @router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
    async def list_models() -> ModelList:
        return ModelList(data=served_models(service.node.state, listed_at))

    @router.get(
        "/v1/models/{model:path}", response_model=None, responses={200: {"model": ModelObject}, **_ERRORS}
    )
    async def get_model(model: str) -> Response:
        for served in served_models(service.node.state, listed_at):
            if served.id == model:
                return JSONResponse(served.model_dump(mode="json"))
        return error_response(
            404,
            f"the model {model!r} does not exist here: no instance of it is placed",
            "invalid_request_error",
            "model",
            "model_not_found",
        )

    app.include_router(router)

"""The Anthropic Messages API on the node: `POST /v1/messages` (streaming and not) and
`POST /v1/messages/count_tokens`.

Inputs: Anthropic request bodies (shapes and conversions in `shoal.api.anthropic_models`). Outputs: a
`message` object, or the event stream (`message_start`, `ping`, `content_block_start/delta/stop`,
`message_delta`, `message_stop`; `ping` again on keep-alive ticks; `error` when the task fails after the
stream started). Every refusal is an Anthropic error object ({"type": "error", "error": {type, message}}):
400 invalid_request_error (also for bodies that do not validate), 404 not_found_error, 503
overloaded_error + Retry-After while the model loads, 500 api_error when the task failed.

count_tokens has no tokenizer on the API side: it runs the prompt through the runner for one token and
reports the runner's prompt count (exact, chat template and tools included; it costs one prefill).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from shoal.api.anthropic_models import (
    CountTokensBody,
    ErrorResponse,
    MessageEvents,
    MessageOut,
    MessagesBody,
    TokenCount,
    chat_prompt,
    error_body,
    message,
    message_outcome,
    new_message_id,
    problem_error_type,
    refuse_unsupported,
    sampling,
    sse,
    tool_specs,
    usage,
)
from shoal.api.service import ApiProblem, Generation, GenerationRequest, GenerationService, generation_params

log = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "invalid_request_error: a field shoal cannot take or honour"),
        (404, "not_found_error: no instance of the model"),
        (500, "api_error: the generation failed"),
        (503, "overloaded_error: the model is loading (Retry-After)"),
    )
}
MESSAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": MessageOut,
        "description": "The message, or with `stream: true` its events (SSE)",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **ERROR_RESPONSES,
}
COUNT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": TokenCount, "description": "The prompt's tokens"},
    **ERROR_RESPONSES,
}


def anthropic_error(
    status: int, error_type: str, message_text: str, retry_after_s: int | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
    return JSONResponse(error_body(error_type, message_text), status_code=status, headers=headers)


def problem_response(problem: ApiProblem) -> JSONResponse:
    return anthropic_error(
        problem.status, problem_error_type(problem), problem.message, problem.retry_after_s
    )


def describe(error: ValidationError | RequestValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc'] if part != 'body') or 'body'}: {item['msg']}"
        for item in error.errors()
    )


class AnthropicRoute(APIRoute):
    """Bodies that do not validate answer 400 in Anthropic's error shape, not the node's 422."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as error:
                return anthropic_error(400, "invalid_request_error", describe(error))

        return route


def add_anthropic_routes(app: FastAPI, service: GenerationService) -> None:
    router = APIRouter(route_class=AnthropicRoute, tags=["anthropic"])

    @router.post("/v1/messages", response_model=None, responses=MESSAGE_RESPONSES)
    async def create_message(body: MessagesBody, http: Request) -> JSONResponse | StreamingResponse:
        try:
            refuse_unsupported(body)
            tools = tool_specs(body.tools, body.tool_choice)
            request = GenerationRequest(
                body.model, chat_prompt(body.system, body.messages), sampling(body), tools
            )
            generation = service.open(request, api="anthropic", disconnected=http.is_disconnected)
        except ApiProblem as problem:
            return problem_response(problem)
        except ValidationError as error:
            return anthropic_error(400, "invalid_request_error", describe(error))
        if body.stream:
            events = MessageEvents(new_message_id(), body.model, body.stop_sequences, parse_tools=bool(tools))
            return StreamingResponse(
                _stream(generation, events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Shoal-Instance": generation.instance.instance_id},
            )
        return await _answer(generation, body, parse_tools=bool(tools))

    @router.post("/v1/messages/count_tokens", response_model=None, responses=COUNT_RESPONSES)
    async def count_tokens(body: CountTokensBody) -> JSONResponse:
        try:
            # counting forces nothing: a tool_choice that would force a call counts like "auto"
            forced = body.tool_choice is not None and body.tool_choice.type in ("any", "tool")
            tools = tool_specs(body.tools, None if forced else body.tool_choice)
            params = generation_params({"temperature": 0.0, "max_tokens": 1})
            request = GenerationRequest(body.model, chat_prompt(body.system, body.messages), params, tools)
            generation = service.open(request, api="anthropic_count_tokens")
        except ApiProblem as problem:
            return problem_response(problem)
        except ValidationError as error:
            return anthropic_error(400, "invalid_request_error", describe(error))
        try:
            await generation.collect()
        finally:
            await generation.aclose()
        if generation.error is not None:
            return anthropic_error(500, "api_error", f"counting failed on the runner: {generation.error}")
        return JSONResponse({"input_tokens": generation.prompt_tokens})

    app.include_router(router)


async def _answer(generation: Generation, body: MessagesBody, parse_tools: bool) -> JSONResponse:
    try:
        await generation.collect()
    except Exception as error:
        # The top of this request: a broken task becomes an error the caller can read, never a bare 500.
        log.exception("anthropic message on instance %s failed", generation.instance.instance_id)
        return anthropic_error(500, "api_error", f"{type(error).__name__}: {error}")
    finally:
        await generation.aclose()
    failure = generation.failure()
    if failure is not None:
        return problem_response(failure)
    if generation.finish_reason is None:
        return anthropic_error(500, "api_error", "the generation ended without finishing")
    result = message_outcome(
        generation.text, generation.logprobs, generation.finish_reason, body.stop_sequences, parse_tools
    )
    counts = usage(generation.prompt_tokens, generation.completion_tokens, generation.cached_tokens)
    return JSONResponse(message(new_message_id(), body.model, result, counts))


async def _stream(generation: Generation, events: MessageEvents) -> AsyncIterator[bytes]:
    try:
        for event in events.start():
            yield sse(event)
        async for chunk in generation:
            for event in events.feed(chunk):
                yield sse(event)
            if events.finished:
                break
        if not events.finished:
            for event in events.fail("the generation ended without a finish"):
                yield sse(event)
    except Exception as error:
        # The top of this request's stream: whatever broke reaches the client as an error event.
        log.exception("anthropic stream on instance %s failed", generation.instance.instance_id)
        for event in events.fail(f"{type(error).__name__}: {error}"):
            yield sse(event)
    finally:
        await generation.aclose()  # a client that left: the router cancels the task on its runner

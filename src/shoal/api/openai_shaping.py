"""A generation's chunks -> OpenAI response objects: whole answers (`chat_completion`, `completion`), the
streamed forms (`ChatStream`, `CompletionStream`: feed chunks, get the objects to send), and errors in
OpenAI's shape. Pure: no I/O, so the shaping of content, tool calls, logprobs and usage is tested on plain
chunks.

Tool calls (when tools were offered): the text goes through `ToolCallStream`, so content streams as it
comes and, from the first sign of a call, is held back; at the end the held text becomes tool_call deltas
(index, id, type, function name and arguments) and the finish reason "tool_calls".
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from shoal.api.openai_models import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    ErrorBody,
    ErrorResponse,
    FunctionCallOut,
    FunctionDelta,
    PromptTokensDetails,
    TokenLogprobOut,
    ToolCallDelta,
    ToolCallOut,
    TopLogprobOut,
    Usage,
)
from shoal.api.service import ApiProblem
from shoal.api.tool_calls import ParsedCall, ToolCallStream, new_call_id, parse_tool_calls
from shoal.types.generation import GenerationChunk, TokenLogprobs

# ApiProblem kinds -> OpenAI's error type and code
_ERROR_KINDS = {
    "invalid_request": ("invalid_request_error", None),
    "model_not_found": ("invalid_request_error", "model_not_found"),
    "model_loading": ("server_error", "model_loading"),
    "unavailable": ("server_error", "unavailable"),
    "server_error": ("server_error", None),
}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))


def error_response(
    status: int, message: str, kind: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code).model_dump(mode="json"), status_code=status)


def problem_response(problem: ApiProblem) -> JSONResponse:
    kind, code = _ERROR_KINDS.get(problem.kind, ("invalid_request_error", problem.kind))
    response = error_response(problem.status, problem.message, kind, problem.param, code)
    if problem.retry_after_s is not None:
        response.headers["Retry-After"] = str(problem.retry_after_s)
    return response


def generation_failed(message: str) -> JSONResponse:
    """A task that failed after it started (non-streaming): never a 200 that hides it."""
    return error_response(500, f"generation failed: {message}", "server_error")


def chat_logprobs(entries: Sequence[TokenLogprobs]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=entry.token,
                logprob=entry.logprob,
                bytes=list(entry.token.encode()),
                top_logprobs=[
                    TopLogprobOut(token=top.token, logprob=top.logprob, bytes=list(top.token.encode()))
                    for top in entry.top
                ],
            )
            for entry in entries
        ]
    )


def completion_logprobs(entries: Sequence[TokenLogprobs], offset: int) -> CompletionLogprobs:
    """The legacy shape; `offset` is where the first token's text starts in the whole answer. Each token's
    alternatives include the token itself, as vLLM's do."""
    shaped = CompletionLogprobs()
    for entry in entries:
        shaped.tokens.append(entry.token)
        shaped.token_logprobs.append(entry.logprob)
        top = {alternative.token: alternative.logprob for alternative in entry.top}
        top.setdefault(entry.token, entry.logprob)
        shaped.top_logprobs.append(top)
        shaped.text_offset.append(offset)
        offset += len(entry.token)
    return shaped


def _tool_calls_out(calls: Sequence[ParsedCall]) -> list[ToolCallOut]:
    return [
        ToolCallOut(id=new_call_id(), function=FunctionCallOut(name=call.name, arguments=call.arguments))
        for call in calls
    ]


def chat_completion(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    logprobs: Sequence[TokenLogprobs] | None,
    finish_reason: str,
    answer_usage: Usage,
    parse_tools: bool,
) -> ChatCompletion:
    content, calls = parse_tool_calls(text) if parse_tools else (text, [])
    message = AssistantMessage(content=content or (None if calls else ""), tool_calls=_tool_calls_out(calls))
    choice = ChatChoice(
        message=message,
        logprobs=chat_logprobs(logprobs) if logprobs is not None else None,
        finish_reason="tool_calls" if calls else finish_reason,
    )
    return ChatCompletion(
        id=completion_id, created=created, model=model, choices=[choice], usage=answer_usage
    )


def completion(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    logprobs: Sequence[TokenLogprobs] | None,
    finish_reason: str,
    answer_usage: Usage,
    echo: str = "",
) -> Completion:
    choice = CompletionChoice(
        text=echo + text,
        logprobs=completion_logprobs(logprobs, len(echo)) if logprobs is not None else None,
        finish_reason=finish_reason,
    )
    return Completion(id=completion_id, created=created, model=model, choices=[choice], usage=answer_usage)


@dataclass
class ChatStream:
    """One streamed chat answer: `start()`, then `feed(chunk)` per chunk, then `finish(...)`."""

    completion_id: str
    created: int
    model: str
    parse_tools: bool
    logprobs: bool
    include_usage: bool
    _calls: ToolCallStream = field(default_factory=ToolCallStream)

    def start(self) -> list[ChatCompletionChunk]:
        return [self._chunk(Delta(role="assistant", content=""))]

    def feed(self, chunk: GenerationChunk) -> list[ChatCompletionChunk]:
        text = self._calls.feed(chunk.text) if self.parse_tools else chunk.text
        logprobs = chat_logprobs(chunk.logprobs) if self.logprobs and chunk.logprobs else None
        if not text and logprobs is None:
            return []
        return [self._chunk(Delta(content=text or None), logprobs=logprobs)]

    def finish(self, finish_reason: str, answer_usage: Usage) -> list[ChatCompletionChunk]:
        out = []
        calls: list[ParsedCall] = []
        if self.parse_tools:
            rest, calls = self._calls.finish()
            if rest:
                out.append(self._chunk(Delta(content=rest)))
        if calls:
            deltas = [
                ToolCallDelta(
                    index=index,
                    id=new_call_id(),
                    type="function",
                    function=FunctionDelta(name=call.name, arguments=call.arguments),
                )
                for index, call in enumerate(calls)
            ]
            out.append(self._chunk(Delta(tool_calls=deltas)))
        out.append(self._chunk(Delta(), finish_reason="tool_calls" if calls else finish_reason))
        if self.include_usage:
            out.append(self._envelope([], answer_usage))
        return out

    def _chunk(
        self, delta: Delta, logprobs: ChoiceLogprobs | None = None, finish_reason: str | None = None
    ) -> ChatCompletionChunk:
        choice = ChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish_reason)
        return self._envelope([choice], None)

    def _envelope(self, choices: list[ChunkChoice], answer_usage: Usage | None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.completion_id, created=self.created, model=self.model, choices=choices, usage=answer_usage
        )


@dataclass
class CompletionStream:
    """One streamed text completion: `start()`, `feed(chunk)` per chunk, then `finish(...)`."""

    completion_id: str
    created: int
    model: str
    logprobs: bool
    include_usage: bool
    echo: str = ""
    _offset: int = 0

    def start(self) -> list[Completion]:
        self._offset = len(self.echo)
        return [self._chunk(self.echo)] if self.echo else []

    def feed(self, chunk: GenerationChunk) -> list[Completion]:
        logprobs = None
        if self.logprobs and chunk.logprobs:
            logprobs = completion_logprobs(chunk.logprobs, self._offset)
            self._offset += sum(len(entry.token) for entry in chunk.logprobs)
        if not chunk.text and logprobs is None:
            return []
        return [self._chunk(chunk.text, logprobs)]

    def finish(self, finish_reason: str, answer_usage: Usage) -> list[Completion]:
        out = [self._chunk("", finish_reason=finish_reason)]
        if self.include_usage:
            out.append(self._envelope([], answer_usage))
        return out

    def _chunk(
        self, text: str, logprobs: CompletionLogprobs | None = None, finish_reason: str | None = None
    ) -> Completion:
        choice = CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish_reason)
        return self._envelope([choice], None)

    def _envelope(self, choices: list[CompletionChoice], answer_usage: Usage | None) -> Completion:
        return Completion(
            id=self.completion_id, created=self.created, model=self.model, choices=choices, usage=answer_usage
        )

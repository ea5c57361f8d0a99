"""The Anthropic Messages API's request and answer shapes, and the pure functions between them and shoal's
wire types: a request body to a chat prompt, sampling params and tools; a finished generation to a
`message`; a stream of chunks to Anthropic's event sequence (`MessageEvents`).

Decisions that are not Anthropic's own:
- `tool_choice` "any" or "tool" would force a call, which shoal's sampling cannot do: refused (400), not
  faked; "none" leaves the tools out of the prompt.
- A conversation that ends with an assistant turn (Anthropic's "prefill") is refused: the chat template
  always opens a new assistant turn.
- The engine says "stop" both for an end-of-sequence token and for a stop string; which stop sequence
  ended the text is read from the last token's text (the request asks for logprobs, which carry each
  token's text, whenever `stop_sequences` is set).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from shoal.api.service import ApiProblem, generation_params
from shoal.api.tool_calls import ParsedCall, ToolCallStream, parse_tool_calls
from shoal.types.generation import (
    ChatMessage,
    GenerationChunk,
    GenerationParams,
    TokenLogprobs,
    ToolCall,
    ToolSpec,
)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    503: "overloaded_error",
}
# How far back (in tokens) a stop sequence that the last token completed may start.
STOP_WINDOW_TOKENS = 64


def _checked_model_name(name: str) -> str:
    # A name becomes a path when matched against local models: a NUL or a lone surrogate cannot be one.
    if "\x00" in name:
        raise ValueError("a model name cannot hold a NUL character")
    try:
        name.encode()
    except UnicodeEncodeError:
        raise ValueError("a model name must be valid Unicode text") from None
    return name


ModelName = Annotated[str, AfterValidator(_checked_model_name)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control, citations and the like: accepted, unused


class TextBlock(_Body):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class InputMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(_Body):
    name: str
    description: str = ""
    input_schema: dict[str, Any]


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class MessagesBody(_Body):
    model: ModelName
    max_tokens: int = Field(ge=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] = []
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float | None = None
    top_k: int | None = None
    tools: list[Tool] = []
    tool_choice: ToolChoice | None = None
    metadata: dict[str, Any] | None = None
    stream: bool = False
    # Features shoal cannot honour: refused when asked for (see `refuse_unsupported`).
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


class CountTokensBody(_Body):
    model: ModelName
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] = []
    tool_choice: ToolChoice | None = None


class ErrorInfo(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    """Every refusal and failure: {"type": "error", "error": {"type": ..., "message": ...}}."""

    type: Literal["error"]
    error: ErrorInfo


class UsageOut(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class MessageOut(BaseModel):
    """The answer of a non-streamed request (documentation: the route builds it as a dict)."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    stop_sequence: str | None
    usage: UsageOut


class TokenCount(BaseModel):
    input_tokens: int


def error_body(error_type: str, message: str) -> dict[str, Any]:
    # A message may quote the request; lone surrogates in it could not be encoded as UTF-8 JSON.
    readable = message.encode("utf-8", "backslashreplace").decode()
    return {"type": "error", "error": {"type": error_type, "message": readable}}


def problem_error_type(problem: ApiProblem) -> str:
    return ERROR_TYPES.get(problem.status, "api_error")


def new_message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def new_tool_use_id() -> str:
    return f"toolu_{secrets.token_hex(12)}"


def _text_of(content: str | Sequence[TextBlock]) -> str:
    return content if isinstance(content, str) else "\n".join(block.text for block in content)


def chat_prompt(
    system: str | list[TextBlock] | None, messages: Sequence[InputMessage]
) -> tuple[ChatMessage, ...]:
    """The conversation as chat messages: tool results become `tool` turns, tool uses the assistant's
    `tool_calls`."""
    if messages[-1].role == "assistant":
        raise ApiProblem(
            400,
            "invalid_request",
            "the last message is an assistant turn (prefill), which shoal cannot continue: "
            "end with a user message",
            param="messages",
        )
    prompt: list[ChatMessage] = []
    if system:
        prompt.append(ChatMessage(role="system", content=_text_of(system)))
    for message in messages:
        if isinstance(message.content, str):
            prompt.append(ChatMessage(role=message.role, content=message.content))
            continue
        texts: list[str] = []
        calls: list[ToolCall] = []
        for block in message.content:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                calls.append(ToolCall(id=block.id, name=block.name, arguments=json.dumps(block.input)))
            else:
                result = _text_of(block.content)
                result = f"error: {result}" if block.is_error else result
                prompt.append(ChatMessage(role="tool", content=result, tool_call_id=block.tool_use_id))
        if texts or calls:
            prompt.append(ChatMessage(role=message.role, content="\n".join(texts), tool_calls=tuple(calls)))
    return tuple(prompt)


def tool_specs(tools: Sequence[Tool], tool_choice: ToolChoice | None) -> tuple[ToolSpec, ...]:
    """The tools the model is offered; "none" offers none. A forced call cannot be honoured: 400."""
    choice = tool_choice.type if tool_choice is not None else "auto"
    if choice in ("any", "tool"):
        raise ApiProblem(
            400,
            "invalid_request",
            f'tool_choice {{"type": "{choice}"}} would force a tool call, which shoal cannot do; '
            'use "auto" (the model decides) or "none"',
            param="tool_choice",
        )
    if choice == "none":
        return ()
    return tuple(
        ToolSpec(name=tool.name, description=tool.description, parameters=json.dumps(tool.input_schema))
        for tool in tools
    )


def refuse_unsupported(body: MessagesBody) -> None:
    """Structured output and extended thinking change what the answer must be: 400, not ignored."""
    if body.output_config is not None and body.output_config.get("format") is not None:
        raise ApiProblem(
            400,
            "invalid_request",
            "output_config.format (structured output) is not supported by shoal",
            param="output_config.format",
        )
    if body.thinking is not None and body.thinking.get("type") not in (None, "disabled"):
        raise ApiProblem(
            400, "invalid_request", "extended thinking is not supported by shoal", param="thinking"
        )


def sampling(body: MessagesBody) -> GenerationParams:
    return generation_params(
        {
            "temperature": body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "top_k": -1 if body.top_k is None else body.top_k,
            "max_tokens": body.max_tokens,
            "stop": body.stop_sequences,
            # each token's text: how a stop sequence is told apart from the end of the turn
            "logprobs": bool(body.stop_sequences),
        }
    )


def matched_stop_sequence(
    text: str, logprobs: Sequence[TokenLogprobs], stop_sequences: Sequence[str]
) -> str | None:
    """The stop sequence that the last token completed, if any (else the turn ended on its own).

    The engine cuts the text just before the first stop string the last token completes; an
    end-of-sequence token is never decoded into the text. So a stop sequence ended the text when it
    ends inside the last token's text and starts exactly where the visible text ends.
    """
    if not stop_sequences or not logprobs:
        return None
    tail = logprobs[-STOP_WINDOW_TOKENS:]
    raw = "".join(entry.token for entry in tail)
    last_start = len(raw) - len(tail[-1].token)
    hits: list[tuple[int, str]] = []
    for stop in stop_sequences:
        start = raw.find(stop, max(0, last_start - len(stop) + 1))
        if start >= 0 and start + len(stop) > last_start and text.endswith(raw[max(0, start - 32) : start]):
            hits.append((start, stop))
    return min(hits)[1] if hits else None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a finished generation reads as an Anthropic message."""

    text: str
    calls: tuple[ParsedCall, ...]
    stop_reason: str
    stop_sequence: str | None


def outcome(text: str, calls: Sequence[ParsedCall], finish_reason: str, stop_sequence: str | None) -> Outcome:
    if calls:
        reason = "tool_use"
    elif finish_reason == "length":
        reason = "max_tokens"
    elif stop_sequence is not None:
        reason = "stop_sequence"
    else:
        reason = "end_turn"
    return Outcome(text, tuple(calls), reason, stop_sequence if reason == "stop_sequence" else None)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, int]:
    # Anthropic counts input tokens read from the cache apart from the rest of the input.
    return {
        "input_tokens": max(0, prompt_tokens - cached_tokens),
        "output_tokens": completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached_tokens,
    }


def tool_use_block(call: ParsedCall) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": new_tool_use_id(),
        "name": call.name,
        "input": json.loads(call.arguments),
    }


def message(message_id: str, model: str, result: Outcome, counts: dict[str, int]) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": result.text}] if result.text else []
    content += [tool_use_block(call) for call in result.calls]
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": result.stop_reason,
        "stop_sequence": result.stop_sequence,
        "usage": counts,
    }


def message_outcome(
    text: str,
    logprobs: Sequence[TokenLogprobs],
    finish_reason: str,
    stop_sequences: Sequence[str],
    parse_tools: bool,
) -> Outcome:
    """A non-streamed generation's outcome (tool calls parsed from the whole text when tools were offered)."""
    content, calls = parse_tool_calls(text) if parse_tools else (text, [])
    return outcome(content, calls, finish_reason, matched_stop_sequence(text, logprobs, stop_sequences))


Event = tuple[str, dict[str, Any]]


@dataclass(slots=True)
class MessageEvents:
    """Chunks in, Anthropic stream events out (name, data). Pure: feed it every chunk, in order."""

    message_id: str
    model: str
    stop_sequences: Sequence[str] = ()
    parse_tools: bool = False
    finished: bool = False
    _tools: ToolCallStream = field(default_factory=ToolCallStream)
    _text: str = ""
    _logprobs: list[TokenLogprobs] = field(default_factory=list)
    _num_tokens: int = 0
    _num_blocks: int = 0
    _text_open: bool = False

    def start(self) -> list[Event]:
        # the prompt's size is known only at the end: message_delta carries every count
        shell: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage(0, 0, 0),
        }
        return [("message_start", {"type": "message_start", "message": shell}), ("ping", {"type": "ping"})]

    def feed(self, chunk: GenerationChunk | None) -> list[Event]:
        if chunk is None:
            return [("ping", {"type": "ping"})]  # keep-alive while nothing arrives
        self._text += chunk.text
        if chunk.logprobs:  # only the tail can hold the stop sequence
            self._logprobs = [*self._logprobs, *chunk.logprobs][-STOP_WINDOW_TOKENS:]
        self._num_tokens += len(chunk.token_ids)
        events = self._text_delta(self._tools.feed(chunk.text) if self.parse_tools else chunk.text)
        if chunk.error is not None or chunk.finish_reason == "abort":
            self.finished = True
            reason = chunk.error or "the generation was aborted before it finished"
            return [*events, ("error", error_body("api_error", reason))]
        if chunk.finish_reason is not None:
            events += self._finish(chunk)
        return events

    def fail(self, reason: str) -> list[Event]:
        self.finished = True
        return [("error", error_body("api_error", reason))]

    def _text_delta(self, text: str) -> list[Event]:
        if not text:
            return []
        events: list[Event] = []
        if not self._text_open:
            self._text_open = True
            block = {"type": "text", "text": ""}
            start = {"type": "content_block_start", "index": self._num_blocks, "content_block": block}
            events.append(("content_block_start", start))
        delta = {"type": "text_delta", "text": text}
        events.append(
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": self._num_blocks, "delta": delta},
            )
        )
        return events

    def _close_block(self) -> list[Event]:
        event = ("content_block_stop", {"type": "content_block_stop", "index": self._num_blocks})
        self._num_blocks += 1
        self._text_open = False
        return [event]

    def _finish(self, chunk: GenerationChunk) -> list[Event]:
        self.finished = True
        rest, calls = self._tools.finish() if self.parse_tools else ("", [])
        events = self._text_delta(rest)
        if self._text_open:
            events += self._close_block()
        for call in calls:
            block = {**tool_use_block(call), "input": {}}
            start = {"type": "content_block_start", "index": self._num_blocks, "content_block": block}
            delta = {"type": "input_json_delta", "partial_json": call.arguments}
            events.append(("content_block_start", start))
            events.append(
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": self._num_blocks, "delta": delta},
                )
            )
            events += self._close_block()
        stop = matched_stop_sequence(self._text, self._logprobs, self.stop_sequences)
        result = outcome("", calls, chunk.finish_reason or "stop", stop)
        completion = chunk.completion_tokens if chunk.completion_tokens is not None else self._num_tokens
        counts = usage(chunk.prompt_tokens or 0, completion, chunk.cached_tokens or 0)
        ending: dict[str, Any] = {"stop_reason": result.stop_reason, "stop_sequence": result.stop_sequence}
        events.append(("message_delta", {"type": "message_delta", "delta": ending, "usage": counts}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events


def sse(event: Event) -> bytes:
    name, data = event
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

"""OpenAI request bodies -> the node's `GenerationRequest`. Pure; an `ApiProblem(400)` naming the field for
what the node cannot honour, rather than pretending: `n` > 1, `logit_bias`, `tool_choice` "required" or a
named function and `response_format` json_object/json_schema (no constrained decoding yet), `suffix`,
`best_of` > 1, several prompts in one completion request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from shoal.api.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    MessageIn,
    NamedToolChoice,
    SamplingFields,
    TextPart,
)
from shoal.api.service import ApiProblem, GenerationRequest, generation_params
from shoal.types.generation import MAX_TOP_LOGPROBS, ChatMessage, Prompt, ToolCall, ToolSpec

# Without max_tokens an answer may run to the end of the context window, as with OpenAI and vLLM; the
# engine caps the number at what the context has left.
UNTIL_CONTEXT_ENDS = 2**31 - 1
_SAMPLING_NAMES = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "ignore_eos",
)


@dataclass(frozen=True, slots=True)
class ChatPlan:
    request: GenerationRequest
    parse_tools: bool  # tools were offered, so the answer's text is searched for calls
    logprobs: bool
    stream: bool
    include_usage: bool


@dataclass(frozen=True, slots=True)
class CompletionPlan:
    request: GenerationRequest
    logprobs: bool
    echo: str  # the prompt text to put before the answer ("" without echo)
    stream: bool
    include_usage: bool


def invalid(message: str, param: str | None) -> ApiProblem:
    return ApiProblem(400, "invalid_request", message, param=param)


def chat_plan(body: ChatCompletionRequest) -> ChatPlan:
    if body.response_format is not None and body.response_format.type != "text":
        raise invalid(
            f"response_format {body.response_format.type!r} is not supported: this node has no constrained "
            "decoding, so it cannot guarantee JSON output; ask for JSON in the prompt instead",
            "response_format",
        )
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    fields = sampling_fields(body, max_tokens)
    fields["logprobs"] = bool(body.logprobs)
    fields["top_logprobs"] = body.top_logprobs or 0
    try:
        params = generation_params(fields)
    except ApiProblem as problem:
        if problem.param == "max_tokens" and body.max_completion_tokens is not None:
            raise invalid(
                problem.message.replace("max_tokens", "max_completion_tokens"), "max_completion_tokens"
            ) from None
        raise
    tools = chat_tools(body)
    request = GenerationRequest(
        model=body.model, prompt=chat_prompt(body.messages), params=params, tools=tools
    )
    return ChatPlan(
        request=request,
        parse_tools=bool(tools),
        logprobs=bool(body.logprobs),
        stream=bool(body.stream),
        include_usage=_include_usage(body),
    )


def completion_plan(body: CompletionRequest) -> CompletionPlan:
    if body.suffix is not None:
        raise invalid("suffix is not supported", "suffix")
    if body.best_of not in (None, 1):
        raise invalid("only best_of=1 is supported", "best_of")
    prompt = completion_prompt(body.prompt)
    if body.echo and not isinstance(prompt, str):
        raise invalid("echo needs a text prompt", "echo")
    num_logprobs = body.logprobs
    if num_logprobs is not None and not 0 <= num_logprobs <= MAX_TOP_LOGPROBS:
        raise invalid(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {num_logprobs}", "logprobs")
    if num_logprobs is not None and body.echo:
        raise invalid("logprobs with echo would need the prompt's logprobs, which are not computed", "echo")
    fields = sampling_fields(body, body.max_tokens if body.max_tokens is not None else 16)
    fields["logprobs"] = num_logprobs is not None
    fields["top_logprobs"] = num_logprobs or 0
    request = GenerationRequest(model=body.model, prompt=prompt, params=generation_params(fields))
    return CompletionPlan(
        request=request,
        logprobs=num_logprobs is not None,
        echo=prompt if body.echo and isinstance(prompt, str) else "",
        stream=bool(body.stream),
        include_usage=_include_usage(body),
    )


def sampling_fields(body: SamplingFields, max_tokens: int | None) -> dict[str, Any]:
    if body.n not in (None, 1):
        raise invalid(f"only n=1 is supported (one choice per request), got n={body.n}", "n")
    if body.logit_bias:
        raise invalid("logit_bias is not supported", "logit_bias")
    fields: dict[str, Any] = {
        name: getattr(body, name) for name in _SAMPLING_NAMES if getattr(body, name) is not None
    }
    fields["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    fields["stop_token_ids"] = list(body.stop_token_ids or [])
    fields["max_tokens"] = UNTIL_CONTEXT_ENDS if max_tokens is None else max_tokens
    return fields


def chat_prompt(messages: list[MessageIn]) -> tuple[ChatMessage, ...]:
    prompt = []
    for index, message in enumerate(messages):
        where = f"messages.[{index}]"
        if message.tool_calls and message.role != "assistant":
            raise invalid("only assistant messages carry tool_calls", f"{where}.tool_calls")
        if message.role == "tool" and not message.tool_call_id:
            raise invalid("a tool message needs the tool_call_id it answers", f"{where}.tool_call_id")
        try:
            prompt.append(
                ChatMessage(
                    # Templates rarely know "developer": it is the system prompt under its newer name.
                    role="system" if message.role == "developer" else message.role,
                    content=_text(message.content, f"{where}.content"),
                    name=message.name,
                    tool_calls=tuple(
                        ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments)
                        for call in message.tool_calls or ()
                    ),
                    tool_call_id=message.tool_call_id if message.role == "tool" else None,
                )
            )
        except ValidationError as error:
            raise invalid(f"{where}: {error.errors()[0]['msg']}", where) from None
    return tuple(prompt)


def chat_tools(body: ChatCompletionRequest) -> tuple[ToolSpec, ...]:
    """The tools to offer: none with tool_choice "none"; "required" or a named function cannot be
    enforced without constrained decoding, so they are refused rather than left to chance."""
    choice = body.tool_choice
    if choice == "required" or isinstance(choice, NamedToolChoice):
        what = "'required'" if choice == "required" else "a named function"
        if not body.tools:
            raise invalid(f"tool_choice {what} needs tools", "tool_choice")
        raise invalid(
            f"tool_choice {what} cannot be enforced: this node has no constrained decoding yet; use "
            "'auto' (the model may answer with a call or with text) or 'none'",
            "tool_choice",
        )
    if not body.tools or choice == "none":
        return ()
    try:
        return tuple(
            ToolSpec(
                name=tool.function.name,
                description=tool.function.description or "",
                parameters=json.dumps(tool.function.parameters or {"type": "object", "properties": {}}),
            )
            for tool in body.tools
        )
    except ValidationError as error:
        raise invalid(f"tools: {error.errors()[0]['msg']}", "tools") from None


def completion_prompt(prompt: str | list[str] | list[int] | list[list[int]]) -> Prompt:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("the prompt is empty", "prompt")
        return prompt
    if not prompt:
        raise invalid("the prompt is empty", "prompt")
    if all(isinstance(token_id, int) for token_id in prompt):
        token_ids = tuple(token_id for token_id in prompt if isinstance(token_id, int))
        if any(token_id < 0 for token_id in token_ids):
            raise invalid("token ids must be >= 0", "prompt")
        return token_ids
    raise invalid(f"send one prompt per request (got {len(prompt)})", "prompt")


def _text(content: str | list[TextPart] | None, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise invalid(f"only text content parts are supported, got type {part.type!r}", param)
        texts.append(part.text)
    return "\n".join(texts)


def _include_usage(body: SamplingFields) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)

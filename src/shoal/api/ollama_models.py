"""The Ollama API's request and answer shapes, and the pure functions between them and shoal's wire types:
options to sampling params, chat messages and generate prompts to a shoal prompt, chunks to NDJSON
objects (`OllamaLines`), model cards to Ollama's model entries.

Decisions that are not Ollama's own:
- Options: the sampling ones are honoured (with Ollama's defaults: temperature 0.8, top_k 40, top_p 0.9,
  repeat_penalty 1.1, num_predict -1 = until the context ends); runtime ones (num_ctx, num_gpu,
  num_thread, ...) are accepted and ignored, shoal sizes its runners itself; anything else is refused.
- `format` (JSON / schema output), `images`, `think`, generate's `suffix`, `template` and `context` are
  refused with a 400 saying so, not silently ignored. `keep_alive` is accepted and ignored (an instance
  stays until it is deleted).
- A model digest is the sha256 of the model card (what is served), not of an Ollama manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict

from shoal.api.service import ApiProblem, generation_params
from shoal.api.tool_calls import ParsedCall, ToolCallStream, new_call_id
from shoal.types.generation import (
    ChatMessage,
    GenerationChunk,
    GenerationParams,
    Prompt,
    Text,
    ToolCall,
    ToolSpec,
)
from shoal.types.instances import ModelCard

LATEST = ":latest"
# num_predict -1 (or -2): generate until the end of the context (the engine caps max_tokens there).
UNTIL_CONTEXT_ENDS = 1 << 30
DEFAULT_OPTIONS: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "repeat_penalty": 1.1,
    "num_predict": -1,
}
# Ollama option -> GenerationParams field
SAMPLING_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
RUNTIME_OPTIONS = frozenset(
    {
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "num_keep",
        "use_mmap",
        "use_mlock",
        "numa",
        "low_vram",
        "vocab_only",
        "f16_kv",
        "logits_all",
        "repeat_last_n",
        "penalize_newline",
    }
)
# Options shoal cannot honour, accepted only at the value that turns them off.
NEUTRAL_OPTIONS: dict[str, float] = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0}


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
    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Body):
    name: str
    arguments: dict[str, Any] = {}


class OllamaToolCall(_Body):
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None


class Function(_Body):
    name: str
    description: str = ""
    parameters: dict[str, Any] = {}


class Tool(_Body):
    type: Literal["function"] = "function"
    function: Function


class _Request(_Body):
    model: ModelName
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: str | float | None = None  # accepted, ignored
    think: bool | str | None = None


class ChatBody(_Request):
    messages: list[Message] = []
    tools: list[Tool] = []


class GenerateBody(_Request):
    prompt: Text = ""  # checked here: a raw prompt goes to the runner as it is
    system: Text | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None


class ShowBody(_Body):
    model: ModelName | None = None
    name: ModelName | None = None  # older clients


class ErrorResponse(BaseModel):
    error: str


def bad(message: str, param: str) -> ApiProblem:
    return ApiProblem(400, "invalid_request", message, param=param)


def model_name(name: str) -> str:
    """Ollama clients name models with a tag; ":latest" is the one tag every shoal model has."""
    return name.removesuffix(LATEST) if name.endswith(LATEST) else name


def refuse_unsupported(body: _Request) -> None:
    if body.format not in (None, ""):
        raise bad("format (JSON or schema-constrained output) is not supported by shoal", "format")
    if body.think not in (None, False):
        raise bad("think: the models shoal serves do not support thinking", "think")


def sampling(options: dict[str, Any] | None) -> GenerationParams:
    """GenerationParams from Ollama options (over Ollama's defaults); 400 naming the option otherwise."""
    given = {**DEFAULT_OPTIONS, **(options or {})}
    fields: dict[str, Any] = {}
    for name, value in given.items():
        if name in SAMPLING_OPTIONS:
            fields[SAMPLING_OPTIONS[name]] = value
        elif name == "num_predict":
            fields["max_tokens"] = _max_tokens(value)
        elif name in NEUTRAL_OPTIONS and value != NEUTRAL_OPTIONS[name]:
            raise bad(f"options.{name}={value!r} is not supported by shoal", f"options.{name}")
        elif name not in RUNTIME_OPTIONS and name not in NEUTRAL_OPTIONS:
            raise bad(f"options.{name}: unknown or unsupported option", f"options.{name}")
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    try:
        return generation_params(fields)
    except ApiProblem as problem:  # name the option as the client spelled it
        options_by_field = {v: k for k, v in SAMPLING_OPTIONS.items()} | {"max_tokens": "num_predict"}
        option = options_by_field.get((problem.param or "").split(".")[0], problem.param)
        raise bad(f"options.{option}: {problem.message}", f"options.{option}") from None


def _max_tokens(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value in (-1, -2):
        return UNTIL_CONTEXT_ENDS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise bad(
            f"options.num_predict must be -1 or a positive integer, got {value!r}", "options.num_predict"
        )
    return value


def chat_prompt(messages: Sequence[Message]) -> tuple[ChatMessage, ...]:
    prompt: list[ChatMessage] = []
    for message in messages:
        if message.images:
            raise bad("images are not supported: shoal serves text-only models", "messages.images")
        calls = tuple(
            ToolCall(id=new_call_id(), name=call.function.name, arguments=json.dumps(call.function.arguments))
            for call in message.tool_calls or ()
        )
        prompt.append(
            ChatMessage(role=message.role, content=message.content, name=message.tool_name, tool_calls=calls)
        )
    return tuple(prompt)


def generate_prompt(body: GenerateBody) -> Prompt:
    """Raw text as it is, else the prompt (and system) rendered with the model's chat template."""
    for name in ("suffix", "template", "context", "images"):
        if getattr(body, name):
            raise bad(f"{name} is not supported by shoal's /api/generate", name)
    if body.raw:
        return body.prompt
    system = (ChatMessage(role="system", content=body.system),) if body.system else ()
    return (*system, ChatMessage(role="user", content=body.prompt))


def tool_specs(tools: Sequence[Tool]) -> tuple[ToolSpec, ...]:
    return tuple(
        ToolSpec(
            name=tool.function.name,
            description=tool.function.description,
            parameters=json.dumps(tool.function.parameters),
        )
        for tool in tools
    )


def ollama_tool_calls(calls: Sequence[ParsedCall]) -> list[dict[str, Any]]:
    return [
        {"function": {"index": i, "name": call.name, "arguments": json.loads(call.arguments)}}
        for i, call in enumerate(calls)
    ]


def timestamp(at: datetime | None = None) -> str:
    return (at or datetime.now(UTC)).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Timings:
    """Nanosecond clock readings of one request (time.perf_counter_ns)."""

    started_ns: int
    first_token_ns: int | None
    ended_ns: int

    def fields(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        first = self.first_token_ns if self.first_token_ns is not None else self.ended_ns
        return {
            "total_duration": self.ended_ns - self.started_ns,
            "load_duration": 0,  # instances are loaded before they serve
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": first - self.started_ns,
            "eval_count": completion_tokens,
            "eval_duration": self.ended_ns - first,
        }


@dataclass(slots=True)
class OllamaLines:
    """Chunks in, Ollama stream objects out, for /api/chat (`chat=True`) or /api/generate. Pure: the
    caller passes the clock readings. Keep-alive ticks produce nothing (NDJSON has no comments)."""

    model: str
    chat: bool
    parse_tools: bool = False
    started_ns: int = 0
    finished: bool = False
    text: str = ""
    calls: list[ParsedCall] = field(default_factory=list)
    _tools: ToolCallStream = field(default_factory=ToolCallStream)
    _first_token_ns: int | None = None
    _num_tokens: int = 0

    def feed(self, chunk: GenerationChunk, now_ns: int) -> list[dict[str, Any]]:
        if chunk.token_ids and self._first_token_ns is None:
            self._first_token_ns = now_ns
        self._num_tokens += len(chunk.token_ids)
        lines = self._content(self._tools.feed(chunk.text) if self.parse_tools else chunk.text)
        if chunk.error is not None or chunk.finish_reason == "abort":
            self.finished = True
            return [*lines, {"error": chunk.error or "the generation was aborted before it finished"}]
        if chunk.finish_reason is None:
            return lines
        self.finished = True
        rest, calls = self._tools.finish() if self.parse_tools else ("", [])
        lines += self._content(rest)
        if calls:
            self.calls = list(calls)
            lines.append(self._object("", done=False, tool_calls=ollama_tool_calls(calls)))
        completion = chunk.completion_tokens if chunk.completion_tokens is not None else self._num_tokens
        timings = Timings(self.started_ns, self._first_token_ns, now_ns)
        final = self._object("", done=True)
        final["done_reason"] = chunk.finish_reason
        final.update(timings.fields(chunk.prompt_tokens or 0, completion))
        return [*lines, final]

    def _content(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        self.text += text
        return [self._object(text, done=False)]

    def _object(
        self, text: str, done: bool, tool_calls: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self.model, "created_at": timestamp()}
        if self.chat:
            line["message"] = {"role": "assistant", "content": text}
            if tool_calls:
                line["message"]["tool_calls"] = tool_calls
        else:
            line["response"] = text
        line["done"] = done
        return line


def merged(lines: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The one object of a non-streamed answer: the final line with all the content (and tool calls)."""
    final = dict(lines[-1])
    if "message" in final:
        calls = [call for line in lines for call in line["message"].get("tool_calls", [])]
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(line["message"]["content"] for line in lines),
        }
        if calls:
            message["tool_calls"] = calls
        final["message"] = message
    else:
        final["response"] = "".join(line["response"] for line in lines)
    return final


def parameter_count(card: ModelCard) -> int:
    return card.weight_bytes // card.dtype_bytes


def parameter_size(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}".rstrip("0").rstrip(".") + unit
    return str(count)


def family(card: ModelCard) -> str:
    """GGUF's architecture name ("llama") from a Hugging Face one ("LlamaForCausalLM")."""
    return card.architecture.removesuffix("ForCausalLM").lower()


def details(card: ModelCard, quant: str | None) -> dict[str, Any]:
    level = quant.upper() if quant not in (None, "none", "auto") else card.dtype.upper()
    return {
        "parent_model": "",
        "format": "gguf" if card.source.lower().endswith(".gguf") else "safetensors",
        "family": family(card),
        "families": [family(card)],
        "parameter_size": parameter_size(parameter_count(card)),
        "quantization_level": level,
    }


def digest(card: ModelCard) -> str:
    return hashlib.sha256(card.model_dump_json().encode()).hexdigest()


def model_entry(card: ModelCard, quant: str | None, size: int, modified: datetime) -> dict[str, Any]:
    """A model as /api/tags lists it."""
    name = card.model_id + LATEST
    return {
        "name": name,
        "model": name,
        "modified_at": timestamp(modified),
        "size": size,
        "digest": digest(card),
        "details": details(card, quant),
    }


def model_info(card: ModelCard) -> dict[str, Any]:
    """/api/show's model_info, with GGUF's key names."""
    arch = family(card)
    return {
        "general.architecture": arch,
        "general.basename": card.model_id,
        "general.parameter_count": parameter_count(card),
        f"{arch}.context_length": card.context_length,
        f"{arch}.embedding_length": card.hidden_size,
        f"{arch}.feed_forward_length": card.intermediate_size,
        f"{arch}.block_count": card.num_layers,
        f"{arch}.attention.head_count": card.num_heads,
        f"{arch}.attention.head_count_kv": card.num_kv_heads,
        f"{arch}.attention.key_length": card.head_dim,
        f"{arch}.vocab_size": card.vocab_size,
    }

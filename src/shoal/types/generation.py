"""Generation tasks on the wire: the request to an instance, its cancellation, and its streamed chunks.

Flow (never through the event log): the API node that holds a request sends `StartGeneration` to the
node of the instance's rank 0 (which hands it to its runner) and to the node of the sampling rank when
that is another node (so it knows where the task's chunks go). Chunks travel as `GenerationChunks`
straight from the sampling rank's node (and errors from any node of the instance) to `origin`, keyed by
task id. `CancelGeneration` goes to rank 0's node when the client leaves.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from shoal.types._base import FrozenModel
from shoal.types.ids import NodeIdField
from shoal.types.instance_ids import InstanceIdField, TaskIdField

MAX_PROMPT_CHARS = 1_000_000
MAX_CHUNKS_PER_FRAME = 256
Text = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]
TokenId = Annotated[int, Field(ge=0)]


Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20


class ToolCall(FrozenModel):
    """A call the model made: `arguments` is the JSON text of the arguments object."""

    id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    name: Name
    arguments: Text = "{}"


class ChatMessage(FrozenModel):
    role: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    content: Text = ""
    name: Name | None = None
    # An assistant turn's calls, and a tool result's answer to one of them.
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: Annotated[str, StringConstraints(max_length=128)] | None = None


class ToolSpec(FrozenModel):
    """A function the model may call; `parameters` is the JSON text of its JSON-schema."""

    name: Name
    description: Text = ""
    parameters: Text = "{}"


Prompt = Text | tuple[TokenId, ...] | Annotated[tuple[ChatMessage, ...], Field(min_length=1)]


class GenerationParams(FrozenModel):
    """The wire form of the engine's SamplingParams (the engine validates the values)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[Annotated[str, StringConstraints(max_length=256)], ...] = ()
    stop_token_ids: tuple[TokenId, ...] = ()
    ignore_eos: bool = False
    max_tokens: Annotated[int, Field(ge=1)] = 256
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] = 0


class StartGeneration(FrozenModel):
    kind: Literal["start_generation"] = "start_generation"
    task_id: TaskIdField
    instance_id: InstanceIdField
    origin: NodeIdField
    prompt: Prompt
    params: GenerationParams
    # Functions the chat template offers the model (chat prompts only).
    tools: Annotated[tuple[ToolSpec, ...], Field(max_length=MAX_TOOLS)] = ()


class CancelGeneration(FrozenModel):
    kind: Literal["cancel_generation"] = "cancel_generation"
    task_id: TaskIdField
    instance_id: InstanceIdField
    origin: NodeIdField


class TopLogprob(FrozenModel):
    token_id: TokenId
    token: str
    logprob: float


class TokenLogprobs(FrozenModel):
    """One generated token's log-probability (and the most likely alternatives when asked for)."""

    token_id: TokenId
    token: str
    logprob: float
    top: Annotated[tuple[TopLogprob, ...], Field(max_length=MAX_TOP_LOGPROBS)] = ()


# Why a task failed: the request itself (a 400), no instance could go on with it (503), or a runner broke.
ErrorKind = Literal["invalid_request", "unavailable", "server_error"]


class GenerationChunk(FrozenModel):
    """Deltas since the previous chunk. The last chunk has `finish_reason` ("stop", "length", "abort") or
    `error` set; usage counts come with the last chunk of a finished task."""

    text: str = ""
    token_ids: tuple[TokenId, ...] = ()
    finish_reason: Annotated[str, StringConstraints(max_length=32)] | None = None
    error: Annotated[str, StringConstraints(max_length=4096)] | None = None
    error_kind: ErrorKind | None = None  # set with `error`; None there means server_error
    prompt_tokens: Annotated[int, Field(ge=0)] | None = None
    completion_tokens: Annotated[int, Field(ge=0)] | None = None
    cached_tokens: Annotated[int, Field(ge=0)] | None = None
    # One entry per token in `token_ids` when the task asked for logprobs.
    logprobs: tuple[TokenLogprobs, ...] = ()

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class GenerationChunks(FrozenModel):
    kind: Literal["generation_chunks"] = "generation_chunks"
    task_id: TaskIdField
    chunks: Annotated[tuple[GenerationChunk, ...], Field(min_length=1, max_length=MAX_CHUNKS_PER_FRAME)]

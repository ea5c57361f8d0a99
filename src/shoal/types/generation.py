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


class ChatMessage(FrozenModel):
    role: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    content: Text


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


class StartGeneration(FrozenModel):
    kind: Literal["start_generation"] = "start_generation"
    task_id: TaskIdField
    instance_id: InstanceIdField
    origin: NodeIdField
    prompt: Prompt
    params: GenerationParams


class CancelGeneration(FrozenModel):
    kind: Literal["cancel_generation"] = "cancel_generation"
    task_id: TaskIdField
    instance_id: InstanceIdField
    origin: NodeIdField


class GenerationChunk(FrozenModel):
    """Deltas since the previous chunk. The last chunk has `finish_reason` ("stop", "length", "abort") or
    `error` set; usage counts come with the last chunk of a finished task."""

    text: str = ""
    token_ids: tuple[TokenId, ...] = ()
    finish_reason: Annotated[str, StringConstraints(max_length=32)] | None = None
    error: Annotated[str, StringConstraints(max_length=4096)] | None = None
    prompt_tokens: Annotated[int, Field(ge=0)] | None = None
    completion_tokens: Annotated[int, Field(ge=0)] | None = None

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class GenerationChunks(FrozenModel):
    kind: Literal["generation_chunks"] = "generation_chunks"
    task_id: TaskIdField
    chunks: Annotated[tuple[GenerationChunk, ...], Field(min_length=1, max_length=MAX_CHUNKS_PER_FRAME)]

"""Messages between a runner process and its supervisor, over one local duplex connection (pickled).

Supervisor -> runner: `SubmitTask`, `CancelTask` (to rank 0 of an instance only), `StopRunner`.
Runner -> supervisor: `StatusReport` on every lifecycle change, `ChunkBatch` once per engine step (the
sampling rank's text/token deltas and rank 0's per-request errors), all keyed by task id.
Both ends are the same program on the same machine, so pickling is safe here; nothing on this
connection comes from a peer node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.engine.sampling import SamplingParams
from shoal.engine.sequence import RequestStats
from shoal.types.generation import TokenLogprobs
from shoal.types.instance_ids import TaskId
from shoal.types.runners import RunnerStatus

# Text, token ids, or chat messages (rendered with the model's own template on rank 0).
TaskPrompt = str | Sequence[int] | Sequence[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class SubmitTask:
    task_id: TaskId
    prompt: TaskPrompt
    params: SamplingParams
    # OpenAI-style function specs for the chat template (chat prompts only).
    tools: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class CancelTask:
    task_id: TaskId


@dataclass(frozen=True, slots=True)
class StopRunner:
    """Leave the group, report ShuttingDown then Shutdown, and exit 0."""

    reason: str = "shutdown requested"


SupervisorMessage = SubmitTask | CancelTask | StopRunner


@dataclass(frozen=True, slots=True)
class StatusReport:
    status: RunnerStatus


@dataclass(frozen=True, slots=True)
class TaskChunk:
    """One step's output for one task: deltas since the previous chunk.

    The last chunk of a task has `finish_reason` set ("stop", "length", "abort"), or `error` set when the
    task failed (a bad request, or the runner died under it); no chunk follows either.
    """

    task_id: TaskId
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprobs, ...] | None = None
    finish_reason: str | None = None
    stats: RequestStats | None = None
    error: str | None = None
    error_kind: str | None = None  # "invalid_request" when the request itself was refused

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(frozen=True, slots=True)
class ChunkBatch:
    chunks: tuple[TaskChunk, ...]


RunnerMessage = StatusReport | ChunkBatch

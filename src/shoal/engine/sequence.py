"""One request's state as it moves through the engine. Plain data: no torch here.

A sequence's tokens are its prompt followed by its output. `num_computed_tokens` counts the leading tokens
whose K/V are in the cache (computed in earlier steps or reused from a shared prefix); the scheduler computes
the rest, chunk by chunk. Invariant: num_computed_tokens <= num_tokens, and the block table covers at least
num_computed_tokens positions.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from shoal.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class RequestStats:
    """What a request cost: token counts and speeds. Speeds are None until they can be measured."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None


@dataclass(eq=False, slots=True)
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # The most output tokens this sequence may produce: params.max_tokens capped by the context window.
    max_output_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache at first admission (what the request reports).
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) of prompt + output, without copying the whole history."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    def append_token(self, token_id: int, now: float) -> None:
        self.output_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def stats(self) -> RequestStats:
        ttft = prefill = decode = None
        if self.first_token_time is not None:
            ttft = self.first_token_time - self.arrival_time
            start = self.first_scheduled_time if self.first_scheduled_time is not None else self.arrival_time
            prefill_s = self.first_token_time - start
            computed = self.num_prompt_tokens - self.num_cached_tokens
            if prefill_s > 0:
                prefill = computed / prefill_s
            if self.last_token_time is not None and self.num_output_tokens > 1:
                decode_s = self.last_token_time - self.first_token_time
                if decode_s > 0:
                    decode = (self.num_output_tokens - 1) / decode_s
        return RequestStats(
            prompt_tokens=self.num_prompt_tokens,
            cached_tokens=self.num_cached_tokens,
            completion_tokens=self.num_output_tokens,
            time_to_first_token_s=ttft,
            prefill_tokens_per_s=prefill,
            decode_tokens_per_s=decode,
        )

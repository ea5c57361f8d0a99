"""Continuous batching under a token budget. No torch here.

Inputs: sequences added by the engine; after each step, the chunks that were computed.
Output of `schedule()`: the ScheduledChunks of one step, prefill and decode mixed.

Each step spends at most `max_num_batched_tokens` tokens on at most `max_num_seqs` sequences:
1. Running sequences first, oldest first: a decoding sequence needs one token, one still in (chunked)
   prefill gets as much of its remaining prompt as the budget allows. When the KV pool runs out, the
   newest running sequence is preempted (its blocks freed, requeued at the head of the waiting queue, to
   be recomputed, mostly from the prefix cache) until the older one fits; nothing new is admitted that step.
2. Then waiting sequences in arrival order (FIFO: one that does not fit blocks those behind it), each
   first taking what the prefix cache already holds.
A sequence whose last token is in a chunk gets `sample=True`: the runner returns a logit row for it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from shoal.engine.batch import ScheduledChunk
from shoal.engine.block_manager import BlockManager
from shoal.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 1024
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError(
                f"the step budget needs >= 1 token and >= 1 sequence, got "
                f"{self.max_num_batched_tokens} tokens, {self.max_num_seqs} sequences"
            )


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and release its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []

        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                scheduled.append((seq, num_new))
                budget -= num_new
                index += 1

        # After a preemption the pool is known to be short: admitting now would only thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                reused = self.block_manager.reuse_prefix(seq)
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = reused
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.allocate(seq, num_new):
                # Give the reused blocks back so they stay evictable while this sequence waits.
                self.block_manager.free(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new

        return [self._chunk(seq, num_new) for seq, num_new in scheduled]

    def on_computed(self, chunks: Iterable[ScheduledChunk], seqs_by_id: dict[int, Sequence]) -> None:
        """Record that the runner wrote the chunks' K/V; their full blocks become reusable prefixes."""
        for chunk in chunks:
            seq = seqs_by_id[chunk.seq_id]
            seq.num_computed_tokens = chunk.end_pos
            self.block_manager.commit_computed(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    @staticmethod
    def _chunk(seq: Sequence, num_new: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        end = start + num_new
        return ScheduledChunk(
            seq_id=seq.seq_id,
            token_ids=tuple(seq.token_ids(start, end)),
            start_pos=start,
            block_table=tuple(seq.block_table),
            sample=end == seq.num_tokens,
        )

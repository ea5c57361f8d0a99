"""What the scheduler hands the model runner each step. Plain data: no torch here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """A contiguous run of one sequence's tokens to compute in this step.

    `token_ids` sit at positions [start_pos, start_pos + len(token_ids)); their K/V are written into the
    cache slots that `block_table` maps those positions to (slot = block_table[pos // block_size] *
    block_size + pos % block_size). Positions below start_pos are already in the cache (earlier steps or a
    reused prefix). `sample` asks for the logits of the chunk's last token.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    sample: bool

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)

"""Ordering indexed events that arrive out of order or with holes (pure bookkeeping, no I/O).

A replica applies events strictly in index order. Events that arrive ahead of the next expected index wait
here; `missing_range` says which range to ask the master for: the hole before the first waiting event, or
the tail the master's heartbeat says exists but never arrived (a lost last broadcast leaves no later event
to reveal the gap).
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

MAX_RANGE = 512  # events per range request: bounded replies, a long catch-up takes several round trips
MAX_PENDING = 4096  # events held ahead of a hole; beyond that the farthest are dropped and fetched later


class Indexed(Protocol):
    @property
    def index(self) -> int: ...


E = TypeVar("E", bound=Indexed)


def missing_range(last_index: int, pending: list[int], master_last_index: int) -> tuple[int, int] | None:
    """The next range to request, or None when nothing is missing.

    `pending` are indices held ahead of `last_index`; `master_last_index` is what the master last said it
    has (0 when unknown).
    """
    first = last_index + 1
    ahead = [i for i in pending if i > last_index]
    if ahead:
        end = min(ahead) - 1
        if end < first:
            return None
    elif master_last_index > last_index:
        end = master_last_index
    else:
        return None
    return first, min(end, first + MAX_RANGE - 1)


class Reorderer(Generic[E]):
    """Holds events that arrived early; hands out the run that continues `last_index`."""

    def __init__(self) -> None:
        self._pending: dict[int, E] = {}

    def offer(self, event: E, last_index: int) -> None:
        """Keep `event` if it is ahead of `last_index` (older ones are duplicates: dropped)."""
        if event.index <= last_index or event.index in self._pending:
            return
        self._pending[event.index] = event
        if len(self._pending) > MAX_PENDING:
            del self._pending[max(self._pending)]

    def take_ready(self, last_index: int) -> list[E]:
        """Pop the contiguous run starting at `last_index + 1`; forget anything at or below `last_index`."""
        for index in [i for i in self._pending if i <= last_index]:
            del self._pending[index]
        ready: list[E] = []
        next_index = last_index + 1
        while next_index in self._pending:
            ready.append(self._pending.pop(next_index))
            next_index += 1
        return ready

    def pending_indices(self) -> list[int]:
        return sorted(self._pending)

    def clear(self) -> None:
        self._pending.clear()

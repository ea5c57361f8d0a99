"""Small bookkeeping the node keeps to survive bad peers and its own failures (no I/O besides logging).

- `MessageDrops`: messages that passed authentication but were dropped at node level (undecodable, a
  claimed sender that is not the sealer, an id clash), counted by reason and logged at most once per
  interval so a flood of bad frames cannot flood the log.
- `RoleBackoff`: after the master role fails, the node is not eligible for it for a while that doubles
  with each failure in a row (reset once a term lasted long enough), so a role that keeps crashing is
  handed to another node instead of being re-elected in a loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("shoal.node")

DROP_WARNING_INTERVAL_S = 10.0


class MessageDrops:
    REASONS = ("undecodable", "spoofed_sender", "clashing_node_id")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.counts: dict[str, int] = dict.fromkeys(self.REASONS, 0)
        self._last_warning = -DROP_WARNING_INTERVAL_S

    def count(self, reason: str, sender: str, detail: str) -> None:
        self.counts[reason] += 1
        now = self._clock()
        if now - self._last_warning >= DROP_WARNING_INTERVAL_S:
            self._last_warning = now
            log.warning(
                "dropped a message from %s (%s: %s); dropped so far: %s",
                sender,
                reason,
                detail[:300],
                self.counts,
            )

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class RoleBackoff:
    def __init__(self, base_s: float = 1.0, max_s: float = 60.0, healthy_after_s: float = 30.0) -> None:
        self._base_s = base_s
        self._max_s = max_s
        self._healthy_after_s = healthy_after_s
        self.num_failures = 0  # in a row
        self.num_failures_total = 0
        self._until = float("-inf")

    def failed(self, started_at: float, now: float) -> float:
        """Record a failure of a term that started at `started_at`; the seconds the node now sits out."""
        if now - started_at >= self._healthy_after_s:
            self.num_failures = 0
        self.num_failures += 1
        self.num_failures_total += 1
        pause = min(self._max_s, self._base_s * 2 ** (self.num_failures - 1))
        self._until = now + pause
        return pause

    def eligible(self, now: float) -> bool:
        return now >= self._until

"""Replica: every node's copy of the cluster state, folded from the master's indexed events.

Inputs: indexed events broadcast by the master it follows (`on_events`), answers to its range requests
(`on_range`), the master's last index from its heartbeats (`on_master_heartbeat`), and, on the master
itself, the events it writes (`commit`). Output: `state`, the node's own EventLog, listeners called with
every run of newly applied events, and `next_request` — the EventRangeRequest to send the master, if any.

Invariants:
- events are applied strictly in index order, each persisted before the state moves past it; duplicates
  (index <= last_index) are skipped; events from anyone but the followed master are ignored;
- on start the state is rebuilt from the node's own log;
- whenever the followed master changes, the replica first checks that its last event is the master's
  event at that index. A node that was master (or wrongly believed it was) may hold events no one else
  has; the check compares its last events with the master's, drops the differing tail from its log (looking
  further back while a whole window differs) — the master's log is the authority.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from shoal.master.event_log import EventLog
from shoal.replica_gaps import MAX_RANGE, Reorderer, missing_range
from shoal.state import InvalidEventError, apply
from shoal.types import EventIndex, EventRangeRequest, IndexedEvent, NodeId, State

log = logging.getLogger(__name__)

VERIFY_WINDOW = 64  # events compared per round trip when checking the log against a new master

Listener = Callable[[Sequence[IndexedEvent]], None]


class Replica:
    def __init__(self, node_id: NodeId, log_path: Path, request_retry_s: float) -> None:
        self.node_id = node_id
        self._log_path = log_path
        self._request_retry_s = request_retry_s
        self._log = EventLog(log_path)
        self.state: State = self._log.replay()
        self._reorder: Reorderer[IndexedEvent] = Reorderer()
        self._listeners: list[Listener] = []
        self._master: NodeId | None = None
        self._master_last_index = 0
        self._verify_index: int | None = None
        self._request_sent_at: float | None = None
        self.num_rejected_events = 0
        self.num_truncations = 0

    # --- state and log -----------------------------------------------------------------------------------

    @property
    def last_index(self) -> int:
        return self.state.last_index

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def read_range(self, first: int, last: int) -> list[IndexedEvent]:
        """Events [first, last] from this node's log (shorter when the log ends sooner)."""
        if first > self.last_index or last < first:
            return []
        return list(self._log.read_range(EventIndex(first), EventIndex(min(last, self.last_index))))

    def commit(self, events: Sequence[IndexedEvent]) -> None:
        """The master's path: `events` must continue the state exactly (raises InvalidEventError if not)."""
        state = self.state
        for event in events:
            state = apply(state, event)
        self._persist(events, state)

    def _persist(self, events: Sequence[IndexedEvent], state: State) -> None:
        if not events:
            return
        self._log.append(list(events))
        self.state = state
        for listener in self._listeners:
            try:
                listener(events)
            except Exception:
                log.exception("event listener failed")

    def _apply_run(self, events: Sequence[IndexedEvent]) -> None:
        """Apply the valid prefix of a contiguous run; an event that does not fold in is dropped (counted),
        together with everything after it."""
        state = self.state
        applied: list[IndexedEvent] = []
        for event in events:
            try:
                state = apply(state, event)
            except InvalidEventError as error:
                self.num_rejected_events += 1
                log.warning("dropped event %d from master %s: %s", event.index, self._master, error)
                break
            applied.append(event)
        self._persist(applied, state)

    def close(self) -> None:
        self._log.close()

    # --- following a master --------------------------------------------------------------------------

    @property
    def master(self) -> NodeId | None:
        return self._master

    @property
    def verifying(self) -> bool:
        return self._verify_index is not None

    def follow(self, master: NodeId | None) -> None:
        """Follow `master` (None: this node is master itself, or there is none yet)."""
        if master == self._master:
            return
        self._master = master
        self._master_last_index = 0
        self._reorder.clear()
        self._request_sent_at = None
        following_other = master is not None and master != self.node_id
        self._verify_index = self.last_index if following_other and self.last_index > 0 else None

    def on_master_heartbeat(self, sender: NodeId, last_index: int) -> None:
        if sender == self._master:
            self._master_last_index = last_index

    def on_event(self, sender: NodeId, event: IndexedEvent) -> None:
        self.on_events(sender, (event,))

    def on_events(self, sender: NodeId, events: Sequence[IndexedEvent]) -> None:
        """A broadcast run of events: applied (and persisted in one append) as far as it continues the log."""
        if sender != self._master or sender == self.node_id:
            return
        for event in events:
            self._reorder.offer(event, self.last_index)
        if not self.verifying:
            self._apply_run(self._reorder.take_ready(self.last_index))

    def on_range(self, sender: NodeId, events: Sequence[IndexedEvent]) -> None:
        if sender != self._master or sender == self.node_id:
            return
        self._request_sent_at = None
        if self._verify_index is not None:
            if not self._check_divergence(events):
                return
            self._verify_index = None
        for event in events:
            self._reorder.offer(event, self.last_index)
        self._apply_run(self._reorder.take_ready(self.last_index))

    def _verify_window(self) -> tuple[int, int]:
        """[first, last] of this node's events compared with the master's in one round trip."""
        assert self._verify_index is not None
        return max(1, self._verify_index - VERIFY_WINDOW + 1), self._verify_index

    def _check_divergence(self, events: Sequence[IndexedEvent]) -> bool:
        """Compare the verification window with the master's `events`. True when the log agrees with the
        master's up to its (possibly truncated) end; False while verification goes on one window earlier,
        or when `events` answered some other request."""
        first, last = self._verify_window()
        if events and events[0].index != first:
            return False
        theirs = {e.index: e for e in events}
        mine = self.read_range(first, last)
        diverged_at = next((e.index for e in mine if theirs.get(e.index) != e), None)
        if diverged_at is None:
            return True
        self._truncate(diverged_at)
        if diverged_at == first and self.last_index > 0:
            self._verify_index = self.last_index  # the whole window differed: look further back
            return False
        return True

    def _truncate(self, index: int) -> None:
        """Drop this node's events from `index` on: the master's log does not have them."""
        self.num_truncations += 1
        log.warning(
            "replica log diverged from master %s: dropping events %d..%d",
            self._master,
            index,
            self.last_index,
        )
        self._log.truncate_from(index)
        self.state = self._log.replay()
        self._reorder.clear()
        self._request_sent_at = None

    def next_request(self, now: float) -> EventRangeRequest | None:
        """The range to ask the followed master for now (at most one outstanding, retried after a while)."""
        if self._master is None or self._master == self.node_id:
            return None
        if self._request_sent_at is not None and now - self._request_sent_at < self._request_retry_s:
            return None
        if self._verify_index is not None:
            first, _ = self._verify_window()
            wanted: tuple[int, int] | None = (first, first + MAX_RANGE - 1)
        else:
            wanted = missing_range(self.last_index, self._reorder.pending_indices(), self._master_last_index)
        if wanted is None:
            return None
        self._request_sent_at = now
        return EventRangeRequest(
            requester=self.node_id, first_index=EventIndex(wanted[0]), last_index=EventIndex(wanted[1])
        )

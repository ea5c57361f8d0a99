"""Election: which node is master, decided by every node alone from the heartbeats it hears.

Inputs: heartbeats from peers (`observe`) and this node's own view (`own_candidate`).
Output: `Election.decide(now)` -> the node this node follows as master, and whether that is itself.

Invariants:
- `choose_master` is pure and deterministic: nodes that hear the same heartbeats choose the same master.
- An incumbent (a live node that says it is master, with the highest term among those that do) keeps the
  role unless a `--force-master` node appears; this keeps a healthy master from flapping because a
  follower's `last_index` briefly equals its own.
- Events from a node say it is master as much as its heartbeats do (`observe_master`): a follower that has
  applied a new master's first events, but still holds that node's heartbeat from before it took the
  role, must not crown itself for holding the longer log (the master's own events, not yet in any
  heartbeat of the master); the master would step down and drop what it had committed.
- A node whose master role keeps failing says so in its heartbeats (`eligible` false while it backs
  off) and is passed over, so the role moves to a healthy node instead of crashing in a loop.
- Without an incumbent: force_master first, then highest last_index (the most complete log, so nothing
  placed is lost), then highest term, then the smallest node id.
- Terms only grow: a node that takes the role uses `next_term` = max term seen + 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from shoal.types.ids import NodeId


@dataclass(frozen=True)
class Candidate:
    """What one node's latest heartbeat says about it, and when it was heard (monotonic seconds)."""

    node_id: NodeId
    term: int
    last_index: int
    force_master: bool
    is_master: bool
    heard_at: float
    eligible: bool = True  # False while the node backs off from the master role after failing in it


def live_candidates(candidates: Iterable[Candidate], now: float, liveness_s: float) -> list[Candidate]:
    """The candidates heard from within the last `liveness_s` seconds."""
    return [c for c in candidates if now - c.heard_at <= liveness_s]


def _incumbent(candidates: list[Candidate]) -> Candidate | None:
    masters = [c for c in candidates if c.is_master]
    if not masters:
        return None
    # Two claimants (a brief split after a partition or a simultaneous start): the higher term wins, then
    # the same order as a fresh election so both sides settle on the same one.
    return min(masters, key=lambda c: (-c.term, -c.last_index, c.node_id))


def choose_master(candidates: Iterable[Candidate], now: float, liveness_s: float) -> NodeId | None:
    """The master among the live, eligible candidates, or None when there is none."""
    live = [c for c in live_candidates(candidates, now, liveness_s) if c.eligible]
    if not live:
        return None
    forced = [c for c in live if c.force_master]
    if forced:
        # Among several operators' forced nodes, the same deterministic order as everyone else.
        return min(forced, key=lambda c: (not c.is_master, -c.last_index, -c.term, c.node_id)).node_id
    incumbent = _incumbent(live)
    if incumbent is not None:
        return incumbent.node_id
    return min(live, key=lambda c: (-c.last_index, -c.term, c.node_id)).node_id


def next_term(candidates: Iterable[Candidate], own_term: int) -> int:
    """The term a node taking the master role uses: one more than any term it has seen."""
    return max([own_term, *(c.term for c in candidates)]) + 1


@dataclass(frozen=True)
class ElectionSettings:
    liveness_s: float  # a peer silent for longer is no longer a candidate
    settle_s: float  # listen this long after start before choosing, so every node has heard the others


@dataclass(frozen=True)
class Decision:
    master: NodeId | None
    is_self: bool


class Election:
    """Tracks candidates from heartbeats; `decide` applies `choose_master` to them and to this node."""

    def __init__(self, node_id: NodeId, settings: ElectionSettings, started_at: float) -> None:
        self.node_id = node_id
        self._settings = settings
        self._started_at = started_at
        self._peers: dict[NodeId, Candidate] = {}

    def settle_from(self, now: float) -> None:
        """Start the settling period again at `now` (the node starts sending its heartbeats only then)."""
        self._started_at = now

    def observe(self, candidate: Candidate) -> None:
        if candidate.node_id != self.node_id:
            self._peers[candidate.node_id] = candidate

    def observe_master(self, node_id: NodeId, last_index: int, now: float) -> None:
        """`node_id` sent events up to `last_index` as master: mark its candidate master and heard now."""
        known = self._peers.get(node_id)  # never this node: `observe` keeps only peers
        if known is None:
            return
        self._peers[node_id] = dataclasses.replace(
            known, is_master=True, last_index=max(known.last_index, last_index), heard_at=now
        )

    def forget(self, node_id: NodeId) -> None:
        self._peers.pop(node_id, None)

    def peers(self, now: float) -> list[Candidate]:
        """Live peers (not this node)."""
        return live_candidates(self._peers.values(), now, self._settings.liveness_s)

    def max_term_seen(self, now: float) -> int:
        return max((c.term for c in self.peers(now)), default=0)

    def decide(self, own: Candidate, now: float) -> Decision:
        """`own` is this node's current view of itself (heard_at is ignored: a node is always live to itself)."""
        settling = now - self._started_at < self._settings.settle_s
        peers = self.peers(now)
        if settling and not own.is_master and not own.force_master and not any(c.is_master for c in peers):
            # Too early to elect: a node that has not yet heard the others would crown itself.
            return Decision(master=None, is_self=False)
        me = Candidate(
            node_id=own.node_id,
            term=own.term,
            last_index=own.last_index,
            force_master=own.force_master,
            is_master=own.is_master,
            heard_at=now,
            eligible=own.eligible,
        )
        master = choose_master([me, *peers], now, self._settings.liveness_s)
        return Decision(master=master, is_self=master == self.node_id)

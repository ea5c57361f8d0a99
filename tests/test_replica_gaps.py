from __future__ import annotations

from dataclasses import dataclass

from shoal.replica_gaps import MAX_RANGE, Reorderer, missing_range


@dataclass(frozen=True)
class Ev:
    index: int


def test_nothing_missing_when_up_to_date() -> None:
    assert missing_range(5, [], master_last_index=5) is None
    assert missing_range(5, [], master_last_index=0) is None
    assert missing_range(5, [3, 4], master_last_index=0) is None


def test_hole_before_first_pending_event() -> None:
    assert missing_range(5, [9, 12], master_last_index=12) == (6, 8)


def test_lost_tail_is_requested_from_heartbeat() -> None:
    assert missing_range(5, [], master_last_index=7) == (6, 7)


def test_range_is_bounded() -> None:
    assert missing_range(0, [], master_last_index=10_000) == (1, MAX_RANGE)


def test_reorderer_releases_contiguous_runs_only() -> None:
    r: Reorderer[Ev] = Reorderer()
    for i in (4, 2, 7, 3):
        r.offer(Ev(i), last_index=1)
    assert [e.index for e in r.take_ready(1)] == [2, 3, 4]
    assert r.pending_indices() == [7]
    assert r.take_ready(4) == []
    assert missing_range(4, r.pending_indices(), 7) == (5, 6)


def test_reorderer_drops_duplicates_and_old_events() -> None:
    r: Reorderer[Ev] = Reorderer()
    r.offer(Ev(1), last_index=3)
    r.offer(Ev(5), last_index=3)
    r.offer(Ev(5), last_index=3)
    assert r.pending_indices() == [5]
    # applied elsewhere (e.g. from a range reply) up to 6: the held event is stale
    assert r.take_ready(6) == []
    assert r.pending_indices() == []

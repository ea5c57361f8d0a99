from __future__ import annotations

from pathlib import Path

from shoal.replica import Replica
from shoal.types import EventIndex, IndexedEvent, MasterElected, NodeId, Term

ME = NodeId("me")
M = NodeId("master")
OTHER = NodeId("other")


def ev(index: int, who: str = "master", stamp: float = 0.0) -> IndexedEvent:
    # A chain of elections is the simplest valid history: each one raises the term.
    return IndexedEvent(
        index=EventIndex(index),
        term=Term(index),
        timestamp=stamp,
        event=MasterElected(node_id=NodeId(who), term=Term(index)),
    )


def make(tmp_path: Path) -> Replica:
    return Replica(ME, tmp_path / "events.sqlite3", request_retry_s=0.5)


def test_applies_in_order_persists_and_rebuilds_on_restart(tmp_path: Path) -> None:
    replica = make(tmp_path)
    seen: list[int] = []
    replica.add_listener(lambda events: seen.extend(e.index for e in events))
    replica.follow(M)
    for i in (1, 2, 3, 2):
        replica.on_event(M, ev(i))
    assert replica.last_index == 3 and seen == [1, 2, 3]
    assert replica.state.master == "master" and replica.state.term == 3
    replica.close()
    again = make(tmp_path)
    assert again.state == replica.state
    again.close()


def test_ignores_events_from_anyone_but_the_followed_master(tmp_path: Path) -> None:
    replica = make(tmp_path)
    replica.follow(M)
    replica.on_event(OTHER, ev(1, "other"))
    assert replica.last_index == 0
    replica.close()


def test_gap_is_requested_then_filled_in_order(tmp_path: Path) -> None:
    replica = make(tmp_path)
    replica.follow(M)
    replica.on_event(M, ev(1))
    replica.on_event(M, ev(4))
    replica.on_event(M, ev(5))
    assert replica.last_index == 1
    request = replica.next_request(now=10.0)
    assert request is not None and (request.first_index, request.last_index) == (2, 3)
    assert replica.next_request(now=10.1) is None  # one outstanding request at a time
    replica.on_range(M, [ev(2), ev(3)])
    assert replica.last_index == 5
    assert replica.next_request(now=10.2) is None
    replica.close()


def test_unanswered_request_is_retried(tmp_path: Path) -> None:
    replica = make(tmp_path)
    replica.follow(M)
    replica.on_master_heartbeat(M, 2)
    assert replica.next_request(now=1.0) is not None
    assert replica.next_request(now=1.2) is None
    again = replica.next_request(now=1.6)
    assert again is not None and (again.first_index, again.last_index) == (1, 2)
    replica.close()


def test_lost_tail_is_fetched_when_master_heartbeat_is_ahead(tmp_path: Path) -> None:
    replica = make(tmp_path)
    replica.follow(M)
    replica.on_event(M, ev(1))
    replica.on_master_heartbeat(OTHER, 9)  # only the master's heartbeat counts
    assert replica.next_request(now=1.0) is None
    replica.on_master_heartbeat(M, 3)
    request = replica.next_request(now=1.0)
    assert request is not None and (request.first_index, request.last_index) == (2, 3)
    replica.close()


def test_new_master_with_same_history_is_verified_and_followed(tmp_path: Path) -> None:
    replica = make(tmp_path)
    replica.follow(M)
    for i in (1, 2):
        replica.on_event(M, ev(i))
    replica.follow(OTHER)
    assert replica.verifying
    replica.on_event(OTHER, ev(3, "other"))  # held until verified
    assert replica.last_index == 2
    request = replica.next_request(now=1.0)
    assert request is not None and request.first_index == 1
    replica.on_range(OTHER, [ev(1), ev(2)])
    assert not replica.verifying and replica.last_index == 3
    assert replica.num_truncations == 0
    replica.close()


def test_diverged_tail_is_dropped_and_replaced_by_the_masters(tmp_path: Path) -> None:
    replica = make(tmp_path)
    replica.follow(ME)  # this node was master and wrote 1..4
    replica.commit([ev(1), ev(2), ev(3, "me", stamp=1.0), ev(4, "me", stamp=1.0)])
    replica.follow(M)  # the cluster went on with another master whose event 3 differs
    request = replica.next_request(now=1.0)
    assert request is not None and request.first_index == 1
    replica.on_range(M, [ev(1), ev(2), ev(3), ev(4), ev(5)])
    assert replica.num_truncations == 1 and not replica.verifying
    assert replica.read_range(1, 5) == [ev(1), ev(2), ev(3), ev(4), ev(5)]
    replica.close()


def test_divergence_older_than_one_window_is_found(tmp_path: Path) -> None:
    from shoal.replica import VERIFY_WINDOW

    n = VERIFY_WINDOW + 10
    replica = make(tmp_path)
    replica.follow(ME)
    replica.commit([ev(1), *(ev(i, "me", stamp=1.0) for i in range(2, n + 1))])
    replica.follow(M)
    first = replica.next_request(now=1.0)
    assert first is not None and first.first_index == n - VERIFY_WINDOW + 1
    replica.on_range(M, [])  # the master's log ends long before
    assert replica.verifying and replica.last_index == n - VERIFY_WINDOW
    second = replica.next_request(now=1.1)
    assert second is not None and second.first_index == 1
    replica.on_range(M, [ev(1), ev(2)])
    assert not replica.verifying
    assert replica.read_range(1, n) == [ev(1), ev(2)]
    replica.close()


def test_log_the_master_never_had_is_dropped_entirely(tmp_path: Path) -> None:
    replica = make(tmp_path)
    replica.follow(ME)
    replica.commit([ev(1, "me", stamp=5.0)])
    replica.follow(M)
    replica.on_range(M, [])  # the master has no event 1 at all
    assert replica.last_index == 0 and not replica.verifying
    replica.on_master_heartbeat(M, 1)
    request = replica.next_request(now=2.0)
    assert request is not None and request.first_index == 1
    replica.close()

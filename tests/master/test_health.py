from __future__ import annotations

from cluster_data import make_profile, state_with_nodes

from shoal.master.health import membership_events, silent_nodes
from shoal.state import apply
from shoal.types import IndexedEvent, NodeId, NodeJoined, NodeProfileUpdated, NodeTimedOut

A = NodeId("a")
INTERVAL = 5.0


def test_unknown_node_joins() -> None:
    state = state_with_nodes()
    profile = make_profile("a")
    assert membership_events(state, profile, None, 0.0, INTERVAL) == [NodeJoined(node_id=A, profile=profile)]


def test_timed_out_node_rejoins() -> None:
    state = state_with_nodes("a")
    timed_out = IndexedEvent(index=state.last_index + 1, term=1, timestamp=0.0, event=NodeTimedOut(node_id=A))
    state = apply(state, timed_out)
    assert [type(e) for e in membership_events(state, make_profile("a"), None, 0.0, INTERVAL)] == [NodeJoined]


def test_same_profile_is_no_event() -> None:
    assert membership_events(state_with_nodes("a"), make_profile("a"), None, 0.0, INTERVAL) == []


def test_structural_change_is_immediate() -> None:
    state = state_with_nodes("a")
    moved = make_profile("a", hostname="renamed")
    assert membership_events(state, moved, last_update_at=9.9, now=10.0, min_update_interval_s=INTERVAL) == [
        NodeProfileUpdated(node_id=A, profile=moved)
    ]


def test_small_resource_drift_is_no_event() -> None:
    state = state_with_nodes("a")
    drift = make_profile("a", memory_available_bytes=(8 << 30) - (1 << 20), link_rtts_ms={})
    assert membership_events(state, drift, None, 100.0, INTERVAL) == []


def test_large_resource_change_is_rate_limited() -> None:
    state = state_with_nodes("a")
    big = make_profile("a", memory_available_bytes=2 << 30)
    assert membership_events(state, big, last_update_at=98.0, now=100.0, min_update_interval_s=INTERVAL) == []
    assert membership_events(state, big, last_update_at=94.0, now=100.0, min_update_interval_s=INTERVAL) == [
        NodeProfileUpdated(node_id=A, profile=big)
    ]


def test_new_link_rtt_counts_but_jitter_does_not() -> None:
    base = make_profile("a", link_rtts_ms={NodeId("b"): 1.0})
    state = state_with_nodes("a")
    state = apply(
        state,
        IndexedEvent(
            index=state.last_index + 1,
            term=1,
            timestamp=0.0,
            event=NodeProfileUpdated(node_id=A, profile=base),
        ),
    )
    jitter = make_profile("a", link_rtts_ms={NodeId("b"): 1.4})
    assert membership_events(state, jitter, None, 100.0, INTERVAL) == []
    slow = make_profile("a", link_rtts_ms={NodeId("b"): 40.0})
    assert membership_events(state, slow, None, 100.0, INTERVAL) == [
        NodeProfileUpdated(node_id=A, profile=slow)
    ]
    # a new peer in the map counts as a moved resource: rate-limited, not immediate
    extra = make_profile("a", link_rtts_ms={NodeId("b"): 1.0, NodeId("c"): 1.0})
    assert membership_events(state, extra, 99.0, 100.0, INTERVAL) == []
    assert membership_events(state, extra, 100.0 - INTERVAL, 100.0, INTERVAL) == [
        NodeProfileUpdated(node_id=A, profile=extra)
    ]


def test_silent_nodes_only_active_and_past_timeout() -> None:
    state = state_with_nodes("a", "b", "c")
    last_heard = {NodeId("a"): 7.0, NodeId("b"): 9.5}
    assert silent_nodes(state, last_heard, now=10.0, timeout_s=2.0) == [NodeId("a")]

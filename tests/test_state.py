"""The reducer on plain data: each event kind, the invariants it enforces, and purity."""

from __future__ import annotations

import random

import pytest

from shoal.state import InvalidEventError, apply, apply_all
from shoal.types import (
    ApiAddress,
    Event,
    EventIndex,
    IndexedEvent,
    MasterElected,
    NodeId,
    NodeJoined,
    NodeLabelRemoved,
    NodeLabelSet,
    NodeProfile,
    NodeProfileUpdated,
    NodeTimedOut,
    State,
    Term,
)

A = NodeId("node-a")
B = NodeId("node-b")
C = NodeId("node-c")


def profile(node_id: NodeId, available_gib: int = 8) -> NodeProfile:
    return NodeProfile(
        node_id=node_id,
        hostname=f"host-{node_id}",
        memory_total_bytes=16 * 2**30,
        memory_available_bytes=available_gib * 2**30,
        cpu_model="test cpu",
        num_cpu_cores=4,
        num_cpu_threads=8,
        disk_free_bytes=2**40,
        api_address=ApiAddress(host="127.0.0.1", port=8000),
        shoal_version="0.1.0",
        started_at=1.0,
    )


def at(index: int, event: Event, term: int = 1) -> IndexedEvent:
    return IndexedEvent(index=EventIndex(index), term=Term(term), timestamp=float(index), event=event)


def fold(*events: Event, term: int = 1) -> State:
    """Elect A in `term`, then apply `events` in order under that term."""
    elected = at(1, MasterElected(node_id=A, term=Term(term)), term)
    return apply_all(State(), [elected, *(at(i, e, term) for i, e in enumerate(events, start=2))])


def test_empty_state() -> None:
    state = State()
    assert (state.last_index, state.term, state.master, state.nodes) == (0, 0, None, {})


def test_first_master_elected() -> None:
    state = apply(State(), at(1, MasterElected(node_id=A, term=Term(1))))
    assert (state.last_index, state.term, state.master) == (1, 1, A)


def test_join_adds_active_node() -> None:
    state = fold(NodeJoined(node_id=A, profile=profile(A)), NodeJoined(node_id=B, profile=profile(B)))
    assert state.last_index == 3
    assert set(state.nodes) == {A, B}
    assert state.nodes[B].status == "active"
    assert state.nodes[B].joined_at_index == 3
    assert state.nodes[B].profile == profile(B)
    assert state.nodes[B].labels == {}
    assert state.active_node_ids() == (A, B)


def test_profile_update_replaces_profile_only() -> None:
    state = fold(
        NodeJoined(node_id=B, profile=profile(B, available_gib=8)),
        NodeLabelSet(node_id=B, key="zone", value="z1"),
        NodeProfileUpdated(node_id=B, profile=profile(B, available_gib=3)),
    )
    record = state.nodes[B]
    assert record.profile.memory_available_bytes == 3 * 2**30
    assert record.labels == {"zone": "z1"}
    assert record.joined_at_index == 2


def test_timeout_marks_node_and_keeps_it() -> None:
    state = fold(
        NodeJoined(node_id=A, profile=profile(A)),
        NodeJoined(node_id=B, profile=profile(B)),
        NodeTimedOut(node_id=B),
    )
    assert state.nodes[B].status == "timed_out"
    assert state.nodes[A].status == "active"
    assert state.active_node_ids() == (A,)


def test_labels_set_overwrite_and_remove() -> None:
    state = fold(
        NodeJoined(node_id=B, profile=profile(B)),
        NodeLabelSet(node_id=B, key="zone", value="z1"),
        NodeLabelSet(node_id=B, key="gpu", value="none"),
        NodeLabelSet(node_id=B, key="zone", value="z2"),
    )
    assert state.nodes[B].labels == {"zone": "z2", "gpu": "none"}
    state = apply(state, at(6, NodeLabelRemoved(node_id=B, key="zone")))
    assert state.nodes[B].labels == {"gpu": "none"}


def test_removing_absent_label_changes_only_the_index() -> None:
    before = fold(NodeJoined(node_id=B, profile=profile(B)))
    after = apply(before, at(3, NodeLabelRemoved(node_id=B, key="zone")))
    assert after.nodes == before.nodes
    assert after.last_index == 3


def test_label_on_timed_out_node() -> None:
    state = fold(
        NodeJoined(node_id=B, profile=profile(B)),
        NodeTimedOut(node_id=B),
        NodeLabelSet(node_id=B, key="zone", value="z1"),
    )
    assert state.nodes[B].status == "timed_out"
    assert state.nodes[B].labels == {"zone": "z1"}


def test_rejoin_of_timed_out_node_reactivates_it() -> None:
    state = fold(
        NodeJoined(node_id=B, profile=profile(B, available_gib=8)),
        NodeLabelSet(node_id=B, key="zone", value="z1"),
        NodeTimedOut(node_id=B),
        NodeJoined(node_id=B, profile=profile(B, available_gib=2)),
    )
    record = state.nodes[B]
    assert record.status == "active"
    assert record.profile.memory_available_bytes == 2 * 2**30
    assert record.labels == {"zone": "z1"}  # operator labels belong to the node's identity
    assert record.joined_at_index == 2  # first join


def test_join_of_active_node_updates_profile() -> None:
    state = fold(NodeJoined(node_id=B, profile=profile(B, 8)), NodeJoined(node_id=B, profile=profile(B, 5)))
    assert state.nodes[B].status == "active"
    assert state.nodes[B].profile.memory_available_bytes == 5 * 2**30


def test_master_elected_with_higher_term() -> None:
    state = fold(NodeJoined(node_id=A, profile=profile(A)), NodeJoined(node_id=B, profile=profile(B)))
    state = apply(state, at(4, NodeTimedOut(node_id=A)))
    state = apply(state, at(5, MasterElected(node_id=B, term=Term(2)), term=2))
    assert (state.master, state.term, state.last_index) == (B, 2, 5)
    assert set(state.nodes) == {A, B}  # a master change keeps the state
    state = apply(state, at(6, NodeLabelSet(node_id=B, key="k", value="v"), term=2))
    assert state.nodes[B].labels == {"k": "v"}


def test_terms_may_skip() -> None:
    state = fold()
    state = apply(state, at(2, MasterElected(node_id=C, term=Term(7)), term=7))
    assert (state.master, state.term) == (C, 7)


@pytest.mark.parametrize("term", [2, 3])
def test_master_elected_must_raise_the_term(term: int) -> None:
    state = fold(term=3)
    with pytest.raises(InvalidEventError, match=f"term {term} does not exceed current term 3"):
        apply(state, at(2, MasterElected(node_id=B, term=Term(term)), term=term))


def test_master_elected_term_must_match_entry_term() -> None:
    with pytest.raises(InvalidEventError, match="differs from its entry's term"):
        apply(State(), at(1, MasterElected(node_id=A, term=Term(2)), term=1))


def test_event_from_a_deposed_term_is_rejected() -> None:
    state = fold(NodeJoined(node_id=B, profile=profile(B)), term=3)
    with pytest.raises(InvalidEventError, match="term 2, but the current term is 3"):
        apply(state, at(3, NodeTimedOut(node_id=B), term=2))


def test_event_before_any_master_is_rejected() -> None:
    with pytest.raises(InvalidEventError, match="current term is 0"):
        apply(State(), at(1, NodeJoined(node_id=A, profile=profile(A)), term=1))


@pytest.mark.parametrize("index", [1, 2, 4, 10])
def test_wrong_index_raises(index: int) -> None:
    state = fold(NodeJoined(node_id=A, profile=profile(A)))  # last index 2
    with pytest.raises(InvalidEventError, match=f"event index {index} does not follow last index 2"):
        apply(state, at(index, NodeTimedOut(node_id=A)))


@pytest.mark.parametrize(
    "event",
    [
        NodeTimedOut(node_id=C),
        NodeProfileUpdated(node_id=C, profile=profile(C)),
        NodeLabelSet(node_id=C, key="k", value="v"),
        NodeLabelRemoved(node_id=C, key="k"),
    ],
)
def test_event_about_unknown_node_raises(event: Event) -> None:
    state = fold(NodeJoined(node_id=A, profile=profile(A)))
    with pytest.raises(InvalidEventError, match="unknown node node-c"):
        apply(state, at(3, event))


def test_apply_is_pure() -> None:
    before = fold(NodeJoined(node_id=B, profile=profile(B)), NodeLabelSet(node_id=B, key="a", value="1"))
    snapshot = before.model_dump()
    after = apply(before, at(4, NodeLabelSet(node_id=B, key="b", value="2")))
    after = apply(after, at(5, NodeTimedOut(node_id=B)))
    assert before.model_dump() == snapshot
    assert after.nodes[B].labels == {"a": "1", "b": "2"}
    # the same inputs give the same output
    assert apply(before, at(4, NodeLabelSet(node_id=B, key="b", value="2"))) == apply(
        before, at(4, NodeLabelSet(node_id=B, key="b", value="2"))
    )


def test_failed_apply_leaves_state_untouched() -> None:
    before = fold(NodeJoined(node_id=B, profile=profile(B)))
    snapshot = before.model_dump()
    with pytest.raises(InvalidEventError):
        apply(before, at(3, NodeLabelSet(node_id=C, key="a", value="1")))
    assert before.model_dump() == snapshot


def test_state_round_trips_through_json() -> None:
    state = fold(
        NodeJoined(node_id=A, profile=profile(A)),
        NodeJoined(node_id=B, profile=profile(B)),
        NodeLabelSet(node_id=B, key="zone", value="z1"),
        NodeTimedOut(node_id=A),
    )
    assert State.model_validate_json(state.model_dump_json()) == state


@pytest.mark.parametrize("seed", range(20))
def test_random_histories_match_a_plain_model(seed: int) -> None:
    """Random valid histories (joins, re-joins, timeouts, label churn, profile updates, elections) folded
    by `apply` agree with a model kept in plain dicts."""
    rng = random.Random(seed)
    node_ids = [NodeId(f"n{i}") for i in range(4)]
    status: dict[NodeId, str] = {}
    labels: dict[NodeId, dict[str, str]] = {}
    joined_at: dict[NodeId, int] = {}
    memory: dict[NodeId, int] = {}
    term, master = 1, node_ids[0]
    state = apply(State(), at(1, MasterElected(node_id=master, term=Term(1))))
    for index in range(2, 200):
        choice = rng.random()
        node_id = rng.choice(node_ids)
        event: Event
        if choice < 0.08:
            term += rng.randint(1, 3)
            master = node_id
            event = MasterElected(node_id=node_id, term=Term(term))
        elif node_id not in status or choice < 0.25:
            gib = rng.randint(1, 16)
            event = NodeJoined(node_id=node_id, profile=profile(node_id, gib))
            status[node_id] = "active"
            joined_at.setdefault(node_id, index)
            labels.setdefault(node_id, {})
            memory[node_id] = gib
        elif choice < 0.4:
            event = NodeTimedOut(node_id=node_id)
            status[node_id] = "timed_out"
        elif choice < 0.55:
            gib = rng.randint(1, 16)
            event = NodeProfileUpdated(node_id=node_id, profile=profile(node_id, gib))
            memory[node_id] = gib
        elif choice < 0.8:
            key, value = rng.choice("abc"), str(rng.randint(0, 9))
            event = NodeLabelSet(node_id=node_id, key=key, value=value)
            labels[node_id][key] = value
        else:
            key = rng.choice("abc")
            event = NodeLabelRemoved(node_id=node_id, key=key)
            labels[node_id].pop(key, None)
        state = apply(state, at(index, event, term))
        assert state.last_index == index
    assert (state.term, state.master) == (term, master)
    assert set(state.nodes) == set(status)
    for node_id, record in state.nodes.items():
        assert record.status == status[node_id]
        assert record.labels == labels[node_id]
        assert record.joined_at_index == joined_at[node_id]
        assert record.profile.memory_available_bytes == memory[node_id] * 2**30

from __future__ import annotations

from cluster_data import state_with_nodes

from shoal.master.commands import Rejection, decide
from shoal.state import apply
from shoal.types import IndexedEvent, NodeId, NodeLabelRemoved, NodeLabelSet, RemoveNodeLabel, SetNodeLabel

A = NodeId("a")


def test_set_label_on_known_node_becomes_event() -> None:
    state = state_with_nodes("a")
    assert decide(state, SetNodeLabel(node_id=A, key="zone", value="eu")) == [
        NodeLabelSet(node_id=A, key="zone", value="eu")
    ]


def test_command_about_unknown_node_is_rejected_with_its_id() -> None:
    state = state_with_nodes("a")
    result = decide(state, SetNodeLabel(node_id=NodeId("ghost"), key="zone", value="eu"))
    assert isinstance(result, Rejection)
    assert "ghost" in result.reason and "unknown node" in result.reason
    assert isinstance(decide(state, RemoveNodeLabel(node_id=NodeId("ghost"), key="zone")), Rejection)


def test_setting_the_same_value_changes_nothing() -> None:
    state = state_with_nodes("a")
    event = NodeLabelSet(node_id=A, key="zone", value="eu")
    state = apply(state, IndexedEvent(index=state.last_index + 1, term=1, timestamp=0.0, event=event))
    assert decide(state, SetNodeLabel(node_id=A, key="zone", value="eu")) == []
    assert decide(state, SetNodeLabel(node_id=A, key="zone", value="us")) == [
        NodeLabelSet(node_id=A, key="zone", value="us")
    ]


def test_remove_label_needs_the_label() -> None:
    state = state_with_nodes("a")
    missing = decide(state, RemoveNodeLabel(node_id=A, key="zone"))
    assert isinstance(missing, Rejection) and "zone" in missing.reason
    event = NodeLabelSet(node_id=A, key="zone", value="eu")
    state = apply(state, IndexedEvent(index=state.last_index + 1, term=1, timestamp=0.0, event=event))
    assert decide(state, RemoveNodeLabel(node_id=A, key="zone")) == [NodeLabelRemoved(node_id=A, key="zone")]

"""The reducer: `apply(state, indexed_event) -> State`, pure.

Inputs: the current State and the next IndexedEvent from the master's log. Output: a new State.
Invariants it enforces (raising `InvalidEventError`, never returning a half-applied state):
- indices are contiguous: the event's index is exactly `state.last_index + 1` (the caller skips duplicates);
- terms only grow: `MasterElected` carries a term above the state's and equal to its IndexedEvent's term;
  every other event carries the current term (an event from a deposed master does not fold in);
- events about a node refer to a node that joined before;
- instance events follow `shoal.instance_state` (an instance is created once, reports name its runners).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import assert_never

from shoal.instance_state import apply_instance_event
from shoal.reducer_errors import InvalidEventError
from shoal.types.events import (
    IndexedEvent,
    MasterElected,
    NodeJoined,
    NodeLabelRemoved,
    NodeLabelSet,
    NodeProfileUpdated,
    NodeTimedOut,
)
from shoal.types.ids import NodeId
from shoal.types.instance_messages import InstanceCreated, InstanceDeleted, RunnerStatusChanged
from shoal.types.state import NodeRecord, State

__all__ = ["InvalidEventError", "apply", "apply_all"]


def apply(state: State, indexed: IndexedEvent) -> State:
    if indexed.index != state.last_index + 1:
        raise InvalidEventError(f"event index {indexed.index} does not follow last index {state.last_index}")
    event = indexed.event
    if isinstance(event, MasterElected):
        if event.term != indexed.term:
            raise InvalidEventError(
                f"event {indexed.index}: MasterElected term {event.term} differs from its entry's term {indexed.term}"
            )
        if event.term <= state.term:
            raise InvalidEventError(
                f"event {indexed.index}: MasterElected term {event.term} does not exceed current term {state.term}"
            )
        return state.model_copy(
            update={"last_index": indexed.index, "term": event.term, "master": event.node_id}
        )
    if indexed.term != state.term:
        raise InvalidEventError(
            f"event {indexed.index} ({event.kind}) has term {indexed.term}, but the current term is {state.term}"
        )
    if isinstance(event, InstanceCreated | InstanceDeleted | RunnerStatusChanged):
        instances, runners = apply_instance_event(state.instances, state.runners, event)
        return state.model_copy(
            update={"last_index": indexed.index, "instances": instances, "runners": runners}
        )
    nodes = dict(state.nodes)
    if isinstance(event, NodeJoined):
        previous = nodes.get(event.node_id)
        if previous is None:
            nodes[event.node_id] = NodeRecord(
                profile=event.profile, status="active", joined_at_index=indexed.index
            )
        else:
            nodes[event.node_id] = previous.model_copy(update={"profile": event.profile, "status": "active"})
    else:
        record = _known_node(state, event.node_id, indexed)
        if isinstance(event, NodeProfileUpdated):
            nodes[event.node_id] = record.model_copy(update={"profile": event.profile})
        elif isinstance(event, NodeTimedOut):
            nodes[event.node_id] = record.model_copy(update={"status": "timed_out"})
        elif isinstance(event, NodeLabelSet):
            labels = {**record.labels, event.key: event.value}
            nodes[event.node_id] = record.model_copy(update={"labels": labels})
        elif isinstance(event, NodeLabelRemoved):
            labels = {key: value for key, value in record.labels.items() if key != event.key}
            nodes[event.node_id] = record.model_copy(update={"labels": labels})
        else:
            assert_never(event)
    return state.model_copy(update={"last_index": indexed.index, "nodes": nodes})


def apply_all(state: State, events: Iterable[IndexedEvent]) -> State:
    for indexed in events:
        state = apply(state, indexed)
    return state


def _known_node(state: State, node_id: NodeId, indexed: IndexedEvent) -> NodeRecord:
    record = state.nodes.get(node_id)
    if record is None:
        raise InvalidEventError(
            f"event {indexed.index} ({indexed.event.kind}) refers to unknown node {node_id}"
        )
    return record

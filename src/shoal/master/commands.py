"""Command validation: `decide(state, command)` says which events a command becomes, or why it is refused.

Pure: the master calls it against its current state (plus the events it already decided in the same batch)
and writes what it returns. A command that would change nothing is accepted with no events.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.types import Command, Event, NodeLabelRemoved, NodeLabelSet, RemoveNodeLabel, SetNodeLabel, State


@dataclass(frozen=True)
class Rejection:
    """Why the master refused a command; `reason` reaches the requester as CommandRejected.reason."""

    reason: str


def decide(state: State, command: Command) -> list[Event] | Rejection:
    if isinstance(command, SetNodeLabel):
        record = state.nodes.get(command.node_id)
        if record is None:
            return Rejection(f"unknown node {command.node_id!r}: no node with this id has joined the cluster")
        if record.labels.get(command.key) == command.value:
            return []
        return [NodeLabelSet(node_id=command.node_id, key=command.key, value=command.value)]
    if isinstance(command, RemoveNodeLabel):
        record = state.nodes.get(command.node_id)
        if record is None:
            return Rejection(f"unknown node {command.node_id!r}: no node with this id has joined the cluster")
        if command.key not in record.labels:
            return Rejection(f"node {command.node_id!r} has no label {command.key!r}")
        return [NodeLabelRemoved(node_id=command.node_id, key=command.key)]
    raise AssertionError(f"unhandled command {command!r}")

"""Command validation: `decide(state, command)` says which events a command becomes, or why it is refused.

Pure: the master calls it against its current state (plus the events it already decided in the same batch)
and writes what it returns. A command that would change nothing is accepted with no events. Instance
commands are decided by `shoal.master.instance_commands`; `new_instance_id` is the id a placement or
creation would give its instance (the master draws a fresh one per command, so this stays pure).
"""

from __future__ import annotations

from shoal.master.instance_commands import decide_instance_command
from shoal.master.rejection import Rejection
from shoal.types import Command, Event, NodeLabelRemoved, NodeLabelSet, RemoveNodeLabel, SetNodeLabel, State
from shoal.types.instance_ids import InstanceId, new_instance_id
from shoal.types.instance_messages import CreateInstance, DeleteInstance, PlaceInstance, ReportRunnerStatus

__all__ = ["Rejection", "decide"]


def decide(
    state: State, command: Command, *, instance_id: InstanceId | None = None
) -> list[Event] | Rejection:
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
    if isinstance(command, PlaceInstance | CreateInstance | DeleteInstance | ReportRunnerStatus):
        result = decide_instance_command(state, command, new_instance_id=instance_id or new_instance_id())
        return result if isinstance(result, Rejection) else list(result)
    raise AssertionError(f"unhandled command {command!r}")

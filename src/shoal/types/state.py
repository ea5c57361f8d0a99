"""The cluster state every node folds from the event log (see `shoal.state.apply`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shoal.types._base import FrozenModel
from shoal.types.commands import LabelKey, LabelValue
from shoal.types.ids import EventIndex, EventIndexField, NodeId, NodeIdField, Term, TermField
from shoal.types.instance_ids import InstanceIdField, RunnerIdField
from shoal.types.instances import Instance
from shoal.types.profiles import NodeProfile
from shoal.types.runners import RunnerStatus

NodeStatus = Literal["active", "timed_out"]


class NodeRecord(FrozenModel):
    """What the cluster knows about one node. `joined_at_index` is the index of its first NodeJoined;
    labels survive timeouts and re-joins (they belong to the node's identity, set by an operator)."""

    profile: NodeProfile
    status: NodeStatus
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    joined_at_index: EventIndexField


class State(FrozenModel):
    """Never mutated: `apply` returns a new State. `runners` holds the last status the cluster recorded
    for each runner of a live instance (a deleted instance's runners leave with it)."""

    last_index: EventIndexField = EventIndex(0)
    term: TermField = Term(0)
    master: NodeIdField | None = None
    nodes: dict[NodeIdField, NodeRecord] = Field(default_factory=dict)
    instances: dict[InstanceIdField, Instance] = Field(default_factory=dict)
    runners: dict[RunnerIdField, RunnerStatus] = Field(default_factory=dict)

    def active_node_ids(self) -> tuple[NodeId, ...]:
        return tuple(node_id for node_id, record in self.nodes.items() if record.status == "active")

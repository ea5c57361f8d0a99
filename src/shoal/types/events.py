"""Events: facts in the past tense, written by the master only, each under a contiguous index.

To add an event: define the class with a unique `kind`, add it to `Event`, handle it in
`shoal.state.apply`, and give it an example in tests/types/type_examples.py (a test fails until you do).
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, TypeAdapter, model_validator

from shoal.types._base import FrozenModel
from shoal.types.commands import LabelKey, LabelValue
from shoal.types.ids import CommandIdField, EventIndex, NodeIdField, TermField
from shoal.types.instance_messages import InstanceCreated, InstanceDeleted, RunnerStatusChanged
from shoal.types.profiles import NodeProfile


class _ProfileMatchesNode(FrozenModel):
    node_id: NodeIdField
    profile: NodeProfile

    @model_validator(mode="after")
    def _check_profile_node(self) -> Self:
        if self.profile.node_id != self.node_id:
            raise ValueError(
                f"profile.node_id {self.profile.node_id!r} differs from node_id {self.node_id!r}"
            )
        return self


class MasterElected(FrozenModel):
    kind: Literal["master_elected"] = "master_elected"
    node_id: NodeIdField
    term: Annotated[TermField, Field(ge=1)]


class NodeJoined(_ProfileMatchesNode):
    """A node joined, or came back (after a restart or a timeout) with the same id."""

    kind: Literal["node_joined"] = "node_joined"


class NodeProfileUpdated(_ProfileMatchesNode):
    kind: Literal["node_profile_updated"] = "node_profile_updated"


class NodeTimedOut(FrozenModel):
    kind: Literal["node_timed_out"] = "node_timed_out"
    node_id: NodeIdField


class NodeLabelSet(FrozenModel):
    kind: Literal["node_label_set"] = "node_label_set"
    node_id: NodeIdField
    key: LabelKey
    value: LabelValue


class NodeLabelRemoved(FrozenModel):
    kind: Literal["node_label_removed"] = "node_label_removed"
    node_id: NodeIdField
    key: LabelKey


Event = Annotated[
    MasterElected
    | NodeJoined
    | NodeProfileUpdated
    | NodeTimedOut
    | NodeLabelSet
    | NodeLabelRemoved
    | InstanceCreated
    | InstanceDeleted
    | RunnerStatusChanged,
    Field(discriminator="kind"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


class IndexedEvent(FrozenModel):
    """An event as the log holds it. `term` is the term of the master that wrote it; `timestamp` is the
    master's wall clock (unix seconds) when it wrote it; `command_id` names the command it answers (None
    for events the master wrote on its own), so a new master can rebuild its answers to recent commands
    from its log and a command resent across a master change is not applied twice."""

    kind: Literal["indexed_event"] = "indexed_event"
    index: Annotated[EventIndex, Field(ge=1)]
    term: TermField
    timestamp: float
    event: Event
    command_id: CommandIdField | None = None


INDEXED_EVENT_ADAPTER: TypeAdapter[IndexedEvent] = TypeAdapter(IndexedEvent)

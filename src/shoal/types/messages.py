"""Wire messages: everything one node sends another over the transport, as one union.

Encode with `encode_wire_message`; decode untrusted bytes with `decode_wire_message`, which raises
`pydantic.ValidationError` (a ValueError) for anything that is not exactly one valid message.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Literal, Self

from pydantic import Field, TypeAdapter, model_validator

from shoal.types._base import FrozenModel
from shoal.types.commands import CommandEnvelope
from shoal.types.events import IndexedEvent
from shoal.types.generation import CancelGeneration, GenerationChunks, StartGeneration
from shoal.types.ids import EventIndex, EventIndexField, NodeIdField, TermField
from shoal.types.profiles import NodeProfile
from shoal.types.replies import CommandAccepted, CommandRejected

MAX_EVENTS_PER_RANGE = 10_000
MAX_COMMANDS_PER_BATCH = 1_000


def _check_contiguous(events: tuple[IndexedEvent, ...]) -> None:
    for before, after in itertools.pairwise(events):
        if after.index != before.index + 1:
            raise ValueError(f"events are not contiguous: {before.index} then {after.index}")


class Heartbeat(FrozenModel):
    """Sent periodically by every node: liveness, election inputs, and the node's current profile."""

    kind: Literal["heartbeat"] = "heartbeat"
    node_id: NodeIdField
    term: TermField
    last_index: EventIndexField
    force_master: bool
    is_master: bool
    # False while the node backs off from the master role after it failed there (see shoal.election).
    eligible: bool
    profile: NodeProfile

    @model_validator(mode="after")
    def _check_profile_node(self) -> Self:
        if self.profile.node_id != self.node_id:
            raise ValueError(
                f"profile.node_id {self.profile.node_id!r} differs from node_id {self.node_id!r}"
            )
        return self


class EventRangeRequest(FrozenModel):
    """Ask for the events [first_index, last_index] (a node that saw a gap, or one catching up)."""

    kind: Literal["event_range_request"] = "event_range_request"
    requester: NodeIdField
    first_index: Annotated[EventIndex, Field(ge=1)]
    last_index: Annotated[EventIndex, Field(ge=1)]

    @model_validator(mode="after")
    def _check_range(self) -> Self:
        if self.last_index < self.first_index:
            raise ValueError(f"last_index {self.last_index} is below first_index {self.first_index}")
        return self


class EventRange(FrozenModel):
    """Contiguous events in index order, answering an EventRangeRequest (possibly only its first part)."""

    kind: Literal["event_range"] = "event_range"
    events: Annotated[tuple[IndexedEvent, ...], Field(max_length=MAX_EVENTS_PER_RANGE)]

    @model_validator(mode="after")
    def _check_contiguous(self) -> Self:
        _check_contiguous(self.events)
        return self


class EventBatch(FrozenModel):
    """The master's live broadcast: the contiguous events it wrote in one round (one frame, one append
    on every replica, however many commands the round held)."""

    kind: Literal["event_batch"] = "event_batch"
    events: Annotated[tuple[IndexedEvent, ...], Field(min_length=1, max_length=MAX_EVENTS_PER_RANGE)]

    @model_validator(mode="after")
    def _check_contiguous(self) -> Self:
        _check_contiguous(self.events)
        return self


class CommandBatch(FrozenModel):
    """Commands one node sends the master together (those its API received while the last were in
    flight); each keeps its own id and origin, and gets its own reply."""

    kind: Literal["command_batch"] = "command_batch"
    commands: Annotated[tuple[CommandEnvelope, ...], Field(min_length=1, max_length=MAX_COMMANDS_PER_BATCH)]


class ReplyBatch(FrozenModel):
    """The master's answers to one node's commands decided in one round."""

    kind: Literal["reply_batch"] = "reply_batch"
    replies: Annotated[
        tuple[CommandAccepted | CommandRejected, ...],
        Field(min_length=1, max_length=MAX_COMMANDS_PER_BATCH),
    ]


class Ping(FrozenModel):
    """Link RTT probe: the receiver answers with a Pong echoing `ping_id` and `sent_at` (the sender's
    monotonic clock), so the sender measures the round trip without comparing clocks across machines."""

    kind: Literal["ping"] = "ping"
    node_id: NodeIdField
    ping_id: Annotated[int, Field(ge=0)]
    sent_at: float


class Pong(FrozenModel):
    kind: Literal["pong"] = "pong"
    node_id: NodeIdField
    ping_id: Annotated[int, Field(ge=0)]
    sent_at: float


WireMessage = Annotated[
    Heartbeat
    | EventRangeRequest
    | EventRange
    | EventBatch
    | CommandBatch
    | ReplyBatch
    | Ping
    | Pong
    | StartGeneration
    | CancelGeneration
    | GenerationChunks,
    Field(discriminator="kind"),
]
WIRE_MESSAGE_ADAPTER: TypeAdapter[WireMessage] = TypeAdapter(WireMessage)


def encode_wire_message(message: WireMessage) -> bytes:
    return WIRE_MESSAGE_ADAPTER.dump_json(message)


def decode_wire_message(payload: bytes) -> WireMessage:
    return WIRE_MESSAGE_ADAPTER.validate_json(payload)

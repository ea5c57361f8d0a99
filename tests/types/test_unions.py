"""Every union: members unique (class and `kind`), each member has an example, each example round-trips
through JSON; and the strict models reject what they should."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError
from type_examples import (
    COMMAND_EXAMPLES,
    EVENT_EXAMPLES,
    NODE_A,
    NODE_B,
    REPLY_EXAMPLES,
    WIRE_EXAMPLES,
    make_profile,
)

from shoal.types import (
    COMMAND_ADAPTER,
    COMMAND_REPLY_ADAPTER,
    EVENT_ADAPTER,
    WIRE_MESSAGE_ADAPTER,
    Command,
    CommandEnvelope,
    CommandId,
    CommandReply,
    Event,
    EventIndex,
    EventRange,
    EventRangeRequest,
    Heartbeat,
    IndexedEvent,
    MasterElected,
    NodeJoined,
    SetNodeLabel,
    Term,
    WireMessage,
    decode_wire_message,
    encode_wire_message,
)

UNIONS: dict[str, tuple[Any, TypeAdapter[Any], dict[type[BaseModel], BaseModel]]] = {
    "Command": (Command, COMMAND_ADAPTER, COMMAND_EXAMPLES),
    "Event": (Event, EVENT_ADAPTER, EVENT_EXAMPLES),
    "CommandReply": (CommandReply, COMMAND_REPLY_ADAPTER, REPLY_EXAMPLES),
    "WireMessage": (WireMessage, WIRE_MESSAGE_ADAPTER, WIRE_EXAMPLES),
}


def members(name: str) -> tuple[type[BaseModel], ...]:
    """The classes of a union declared as Annotated[A | B | ..., Field(discriminator="kind")]."""
    union = typing.get_args(UNIONS[name][0])[0]
    return typing.get_args(union)


def kind_of(member: type[BaseModel]) -> str:
    (kind,) = typing.get_args(member.model_fields["kind"].annotation)
    assert member.model_fields["kind"].default == kind
    return str(kind)


@pytest.mark.parametrize("name", UNIONS)
def test_union_members_are_unique(name: str) -> None:
    classes = members(name)
    assert len(classes) >= 2
    assert len(set(classes)) == len(classes)
    assert len({cls.__name__ for cls in classes}) == len(classes)
    kinds = [kind_of(cls) for cls in classes]
    assert len(set(kinds)) == len(kinds), kinds


def test_kinds_are_unique_across_all_unions() -> None:
    """A `kind` names one class everywhere, so a payload is never ambiguous between families."""
    kind_to_class: dict[str, type[BaseModel]] = {}
    for name in UNIONS:
        for cls in members(name):
            assert kind_to_class.setdefault(kind_of(cls), cls) is cls


@pytest.mark.parametrize("name", UNIONS)
def test_every_member_has_an_example(name: str) -> None:
    _, _, examples = UNIONS[name]
    assert set(examples) == set(members(name))
    for cls, example in examples.items():
        assert type(example) is cls


@pytest.mark.parametrize(
    ("name", "cls"), [(name, cls) for name, (_, _, examples) in UNIONS.items() for cls in examples]
)
def test_member_round_trips_through_json(name: str, cls: type[BaseModel]) -> None:
    _, adapter, examples = UNIONS[name]
    example = examples[cls]
    payload = adapter.dump_json(example)
    decoded = adapter.validate_json(payload)
    assert type(decoded) is cls
    assert decoded == example
    assert adapter.dump_json(decoded) == payload
    # the class alone decodes its own JSON too (what the event log stores)
    assert cls.model_validate_json(example.model_dump_json()) == example


def test_wire_helpers_round_trip() -> None:
    for message in WIRE_EXAMPLES.values():
        assert decode_wire_message(WIRE_MESSAGE_ADAPTER.dump_json(message)) == message
    heartbeat = WIRE_EXAMPLES[Heartbeat]
    assert isinstance(heartbeat, Heartbeat)
    assert decode_wire_message(encode_wire_message(heartbeat)) == heartbeat


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[]",
        b'{"kind": "no_such_message"}',
        b'{"kind": "ping", "node_id": "a", "ping_id": 1}',
        b'{"kind": "ping", "node_id": "a", "ping_id": 1, "sent_at": 1.0, "extra": 2}',
        b'{"kind": "ping", "node_id": "a", "ping_id": "1", "sent_at": 1.0}',
        b'{"kind": "ping", "node_id": "shoal/*", "ping_id": 1, "sent_at": 1.0}',
        b'{"kind": "event_range_request", "requester": "a", "first_index": 5, "last_index": 4}',
        b'{"kind": "event_range_request", "requester": "a", "first_index": 0, "last_index": 4}',
    ],
)
def test_bad_wire_payloads_are_rejected(payload: bytes) -> None:
    with pytest.raises(ValidationError):
        decode_wire_message(payload)


def test_models_are_frozen() -> None:
    command = SetNodeLabel(node_id=NODE_A, key="zone", value="a")
    with pytest.raises(ValidationError):
        command.value = "b"  # type: ignore[misc]


def test_strict_models_do_not_coerce() -> None:
    with pytest.raises(ValidationError):
        MasterElected(node_id=NODE_A, term="2")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        MasterElected(node_id=NODE_A, term=Term(0))  # a master is elected in term 1 or later


def test_profile_must_belong_to_its_node() -> None:
    with pytest.raises(ValidationError, match="differs from node_id"):
        NodeJoined(node_id=NODE_B, profile=make_profile(NODE_A))


MASTER_ELECTED = MasterElected(node_id=NODE_A, term=Term(1))


def test_event_range_must_be_contiguous() -> None:
    def indexed(index: int) -> IndexedEvent:
        return IndexedEvent(index=EventIndex(index), term=Term(1), timestamp=0.0, event=MASTER_ELECTED)

    assert len(EventRange(events=(indexed(3), indexed(4))).events) == 2
    with pytest.raises(ValidationError, match="not contiguous"):
        EventRange(events=(indexed(3), indexed(5)))


def test_label_keys_are_validated() -> None:
    for bad_key in ("", "has space", "*", "-leading"):
        with pytest.raises(ValidationError):
            SetNodeLabel(node_id=NODE_A, key=bad_key, value="x")


def test_envelope_carries_any_command() -> None:
    for command in COMMAND_EXAMPLES.values():
        envelope = CommandEnvelope.model_validate(
            {"command_id": CommandId("c1"), "origin": NODE_B, "command": command}
        )
        assert CommandEnvelope.model_validate_json(envelope.model_dump_json()) == envelope


def test_range_request_accepts_single_index() -> None:
    request = EventRangeRequest(requester=NODE_A, first_index=EventIndex(4), last_index=EventIndex(4))
    assert request.first_index == request.last_index

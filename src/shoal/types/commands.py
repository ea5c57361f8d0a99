"""Commands: imperative requests any node sends to the master, which accepts or rejects each one.

To add a command: define the class with a unique `kind`, add it to `Command`, and give it an example in
tests/types/type_examples.py (a test fails until you do).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, TypeAdapter

from shoal.types._base import FrozenModel
from shoal.types.ids import CommandIdField, NodeIdField
from shoal.types.instance_messages import CreateInstance, DeleteInstance, PlaceInstance, ReportRunnerStatus

LABEL_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$"
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, StringConstraints(max_length=256)]


class SetNodeLabel(FrozenModel):
    """Set an operator label on a node (placement constraints select nodes by label)."""

    kind: Literal["set_node_label"] = "set_node_label"
    node_id: NodeIdField
    key: LabelKey
    value: LabelValue


class RemoveNodeLabel(FrozenModel):
    kind: Literal["remove_node_label"] = "remove_node_label"
    node_id: NodeIdField
    key: LabelKey


Command = Annotated[
    SetNodeLabel | RemoveNodeLabel | PlaceInstance | CreateInstance | DeleteInstance | ReportRunnerStatus,
    Field(discriminator="kind"),
]
COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


class CommandEnvelope(FrozenModel):
    """A command on its way to the master; the reply goes back to `origin` under `command_id`."""

    kind: Literal["command_envelope"] = "command_envelope"
    command_id: CommandIdField
    origin: NodeIdField
    command: Command

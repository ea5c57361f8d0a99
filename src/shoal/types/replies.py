"""The master's answer to each command, sent to the node that sent it."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, StringConstraints, TypeAdapter, model_validator

from shoal.types._base import FrozenModel
from shoal.types.ids import CommandIdField, EventIndex


class CommandAccepted(FrozenModel):
    """The command's events were written at indices [first_index, last_index]; a command that changes
    nothing (e.g. setting a label to its current value) is accepted with last_index = first_index - 1."""

    kind: Literal["command_accepted"] = "command_accepted"
    command_id: CommandIdField
    first_index: Annotated[EventIndex, Field(ge=1)]
    last_index: Annotated[EventIndex, Field(ge=0)]

    @model_validator(mode="after")
    def _check_range(self) -> Self:
        if self.last_index < self.first_index - 1:
            raise ValueError(
                f"last_index {self.last_index} is below first_index - 1 ({self.first_index - 1})"
            )
        return self


class CommandRejected(FrozenModel):
    kind: Literal["command_rejected"] = "command_rejected"
    command_id: CommandIdField
    reason: Annotated[str, StringConstraints(max_length=4096)]


CommandReply = Annotated[CommandAccepted | CommandRejected, Field(discriminator="kind")]
COMMAND_REPLY_ADAPTER: TypeAdapter[CommandReply] = TypeAdapter(CommandReply)

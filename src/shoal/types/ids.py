"""Identifiers. Each id is its own type for the type checker; the `*Field` aliases add the validation
pydantic applies wherever the id arrives from outside (messages from peers, HTTP bodies, the event log).

Node ids and command ids end up inside zenoh key expressions (`shoal/<cluster>/to/<node_id>/...`), so their
alphabet excludes every character with a meaning there (`/ * $ # ?`).
"""

from __future__ import annotations

import uuid
from typing import Annotated, NewType

from pydantic import Field, StringConstraints

NodeId = NewType("NodeId", str)
"""A node's identity: derived from its public key (see `shoal.identity`), stable across restarts."""

CommandId = NewType("CommandId", str)
"""Chosen by the node that sends a command (uuid4 hex); the master's reply carries it back."""

EventIndex = NewType("EventIndex", int)
"""Position in the cluster's event log. The first event has index 1; 0 means 'no event yet'."""

Term = NewType("Term", int)
"""Election term: grows by one with each elected master; 0 before the first election."""

NODE_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
COMMAND_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

NodeIdField = Annotated[NodeId, StringConstraints(pattern=NODE_ID_PATTERN)]
CommandIdField = Annotated[CommandId, StringConstraints(pattern=COMMAND_ID_PATTERN)]
EventIndexField = Annotated[EventIndex, Field(ge=0)]
TermField = Annotated[Term, Field(ge=0)]


def new_command_id() -> CommandId:
    return CommandId(uuid.uuid4().hex)

"""Identifiers of the work a cluster runs: instances, their runners, generation tasks.

Same style as `shoal.types.ids` (and meant to join that module when instances are wired into the
`Command`/`Event` unions). They appear in zenoh key expressions (a task's token stream has its own key), so
their alphabet excludes every character with a meaning there (`/ * $ # ?`).
"""

from __future__ import annotations

import uuid
from typing import Annotated, NewType

from pydantic import StringConstraints

InstanceId = NewType("InstanceId", str)
"""One placed copy of a model across one or more nodes; chosen by the master (uuid4 hex)."""

RunnerId = NewType("RunnerId", str)
"""One runner subprocess: one shard of one instance. Derived from the instance id and the shard's rank."""

TaskId = NewType("TaskId", str)
"""One generation request handed to an instance; chosen by the API node that holds the request."""

WORK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

InstanceIdField = Annotated[InstanceId, StringConstraints(pattern=WORK_ID_PATTERN)]
RunnerIdField = Annotated[RunnerId, StringConstraints(pattern=WORK_ID_PATTERN)]
TaskIdField = Annotated[TaskId, StringConstraints(pattern=WORK_ID_PATTERN)]


def new_instance_id() -> InstanceId:
    return InstanceId(uuid.uuid4().hex)


def new_task_id() -> TaskId:
    return TaskId(uuid.uuid4().hex)


def runner_id_for(instance_id: InstanceId, rank: int) -> RunnerId:
    """Deterministic, so that placement stays a pure function and a runner's id names its instance."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return RunnerId(f"{instance_id}-r{rank}")

"""Commands and events about instances and runners.

The commands are members of `shoal.types.Command`, the events of `shoal.types.Event`.

Flow: any node sends `PlaceInstance` (the master runs placement) or `CreateInstance` (an exact instance,
e.g. a chosen preview; the master re-checks it) and the master writes `InstanceCreated`. Workers report
what their runners do with `ReportRunnerStatus`; the master writes `RunnerStatusChanged`. `DeleteInstance`
(from a person, or the master's own health checks) becomes `InstanceDeleted`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import StringConstraints, model_validator

from shoal.types._base import FrozenModel
from shoal.types.ids import NodeIdField
from shoal.types.instance_ids import InstanceIdField, RunnerIdField
from shoal.types.instances import Instance, ModelCard, PlacementRequest
from shoal.types.runners import RunnerStatus

Reason = Annotated[str, StringConstraints(min_length=1, max_length=2000)]


class PlaceInstance(FrozenModel):
    """Place `model` as `request` asks; the master picks the nodes, ranks and ports."""

    kind: Literal["place_instance"] = "place_instance"
    model: ModelCard
    request: PlacementRequest

    @model_validator(mode="after")
    def _check_model(self) -> Self:
        if self.model.model_id != self.request.model_id:
            raise ValueError(
                f"request is for model {self.request.model_id!r} but the card is for {self.model.model_id!r}"
            )
        return self


class CreateInstance(FrozenModel):
    """Create exactly this instance (the master still checks nodes, memory and backends)."""

    kind: Literal["create_instance"] = "create_instance"
    instance: Instance


class DeleteInstance(FrozenModel):
    kind: Literal["delete_instance"] = "delete_instance"
    instance_id: InstanceIdField
    reason: Reason = "deleted on request"


class ReportRunnerStatus(FrozenModel):
    """A worker tells the master what one of its runners is doing now."""

    kind: Literal["report_runner_status"] = "report_runner_status"
    runner_id: RunnerIdField
    instance_id: InstanceIdField
    node_id: NodeIdField
    status: RunnerStatus


class InstanceCreated(FrozenModel):
    kind: Literal["instance_created"] = "instance_created"
    instance: Instance


class InstanceDeleted(FrozenModel):
    kind: Literal["instance_deleted"] = "instance_deleted"
    instance_id: InstanceIdField
    reason: Reason


class RunnerStatusChanged(FrozenModel):
    kind: Literal["runner_status_changed"] = "runner_status_changed"
    runner_id: RunnerIdField
    instance_id: InstanceIdField
    node_id: NodeIdField
    status: RunnerStatus


# Plain type-level unions for the code that handles these (master decisions, reducer helper); the
# discriminated unions on the wire stay `Command` and `Event`.
InstanceCommand = PlaceInstance | CreateInstance | DeleteInstance | ReportRunnerStatus
InstanceEvent = InstanceCreated | InstanceDeleted | RunnerStatusChanged

INSTANCE_COMMANDS: tuple[type[FrozenModel], ...] = (
    PlaceInstance,
    CreateInstance,
    DeleteInstance,
    ReportRunnerStatus,
)
INSTANCE_EVENTS: tuple[type[FrozenModel], ...] = (InstanceCreated, InstanceDeleted, RunnerStatusChanged)

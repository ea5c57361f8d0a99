"""How instance events fold into the cluster state: the instance part of the reducer, pure.

`apply_instance_event(instances, runners, event)` returns the new (instances, runners) tables; the
reducer in `shoal.state` calls it for these event kinds. Invariants it
enforces (raising `InvalidEventError`): an instance id is created once; deleting or reporting on an
instance needs it to exist; a runner status names a runner of that instance on that node. Deleting an
instance removes its runners' statuses too, so nothing of it lingers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import assert_never

from shoal.reducer_errors import InvalidEventError
from shoal.types.instance_ids import InstanceId, RunnerId
from shoal.types.instance_messages import InstanceCreated, InstanceDeleted, InstanceEvent, RunnerStatusChanged
from shoal.types.instances import Instance
from shoal.types.runners import RunnerStatus


def apply_instance_event(
    instances: Mapping[InstanceId, Instance],
    runners: Mapping[RunnerId, RunnerStatus],
    event: InstanceEvent,
) -> tuple[dict[InstanceId, Instance], dict[RunnerId, RunnerStatus]]:
    new_instances, new_runners = dict(instances), dict(runners)
    if isinstance(event, InstanceCreated):
        instance_id = event.instance.instance_id
        if instance_id in instances:
            raise InvalidEventError(f"instance {instance_id} is created twice")
        new_instances[instance_id] = event.instance
    elif isinstance(event, InstanceDeleted):
        deleted = new_instances.pop(event.instance_id, None)
        if deleted is None:
            raise InvalidEventError(f"deleted instance {event.instance_id} does not exist")
        for runner_id in deleted.runner_ids:
            new_runners.pop(runner_id, None)
    elif isinstance(event, RunnerStatusChanged):
        instance = instances.get(event.instance_id)
        if instance is None:
            raise InvalidEventError(
                f"runner {event.runner_id} reports on unknown instance {event.instance_id}"
            )
        shard = instance.shard_on(event.node_id)
        if shard is None or shard.runner_id != event.runner_id:
            raise InvalidEventError(
                f"runner {event.runner_id} on node {event.node_id} is not a runner of instance {event.instance_id}"
            )
        new_runners[event.runner_id] = event.status
    else:
        assert_never(event)
    return new_instances, new_runners

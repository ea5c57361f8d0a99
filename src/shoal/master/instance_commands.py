"""The master's decisions about instances, pure: which events a command becomes, or why it is refused.

`decide_instance_command(cluster, command, new_instance_id=...)`:
- PlaceInstance: runs `place` on the active nodes and their measured links; InstanceCreated or the
  placement's reason.
- CreateInstance: the exact instance, if its id is new and its nodes are active, can run its devices and
  have the memory its shards need.
- DeleteInstance: InstanceDeleted, or a refusal for an unknown instance.
- ReportRunnerStatus: RunnerStatusChanged when the status changed; a runner that failed or shut down
  while its instance exists also deletes the instance (its siblings then stop: see `shoal.worker.plan`),
  so a broken instance never receives tasks and never lingers.
`instances_lost_with_node(instances, node_id)`: the deletions a node timeout calls for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from shoal.master.placement import PlacementError, links_from_nodes, place
from shoal.master.rejection import Rejection
from shoal.master.shard_memory import RUNNER_OVERHEAD_BYTES, format_bytes
from shoal.types.ids import NodeId
from shoal.types.instance_ids import InstanceId, RunnerId
from shoal.types.instance_messages import (
    CreateInstance,
    DeleteInstance,
    InstanceCommand,
    InstanceCreated,
    InstanceDeleted,
    InstanceEvent,
    PlaceInstance,
    ReportRunnerStatus,
    RunnerStatusChanged,
)
from shoal.types.instances import Instance
from shoal.types.runners import RunnerFailed, RunnerShutdown, RunnerStatus
from shoal.types.state import NodeRecord


class InstanceCluster(Protocol):
    """What these decisions read from the cluster state."""

    @property
    def nodes(self) -> Mapping[NodeId, NodeRecord]: ...

    @property
    def instances(self) -> Mapping[InstanceId, Instance]: ...

    @property
    def runners(self) -> Mapping[RunnerId, RunnerStatus]: ...


def decide_instance_command(
    cluster: InstanceCluster, command: InstanceCommand, *, new_instance_id: InstanceId
) -> list[InstanceEvent] | Rejection:
    if isinstance(command, PlaceInstance):
        if new_instance_id in cluster.instances:
            return Rejection(f"instance id {new_instance_id} is already in use")
        placed = place(
            command.model,
            cluster.nodes,
            links_from_nodes(cluster.nodes),
            command.request,
            instance_id=new_instance_id,
            existing=cluster.instances.values(),
        )
        if isinstance(placed, PlacementError):
            return Rejection(placed.reason)
        return [InstanceCreated(instance=placed)]
    if isinstance(command, CreateInstance):
        problem = _create_problem(cluster, command.instance)
        return Rejection(problem) if problem else [InstanceCreated(instance=command.instance)]
    if isinstance(command, DeleteInstance):
        if command.instance_id not in cluster.instances:
            return Rejection(f"unknown instance {command.instance_id}")
        return [InstanceDeleted(instance_id=command.instance_id, reason=command.reason)]
    if isinstance(command, ReportRunnerStatus):
        return _decide_report(cluster, command)
    raise AssertionError(f"unhandled instance command {command!r}")


def instances_lost_with_node(
    instances: Mapping[InstanceId, Instance], node_id: NodeId
) -> list[InstanceDeleted]:
    return [
        InstanceDeleted(instance_id=instance_id, reason=f"node {node_id} timed out")
        for instance_id, instance in sorted(instances.items())
        if node_id in instance.node_ids
    ]


def _decide_report(cluster: InstanceCluster, command: ReportRunnerStatus) -> list[InstanceEvent] | Rejection:
    instance = cluster.instances.get(command.instance_id)
    if instance is None:
        return Rejection(f"unknown instance {command.instance_id} (deleted?)")
    shard = instance.shard_on(command.node_id)
    if shard is None or shard.runner_id != command.runner_id:
        return Rejection(
            f"runner {command.runner_id} on node {command.node_id} is not a runner of instance {command.instance_id}"
        )
    if cluster.runners.get(command.runner_id) == command.status:
        return []
    events: list[InstanceEvent] = [
        RunnerStatusChanged(
            runner_id=command.runner_id,
            instance_id=command.instance_id,
            node_id=command.node_id,
            status=command.status,
        )
    ]
    status = command.status
    if isinstance(status, RunnerFailed | RunnerShutdown):
        what = f"failed: {status.reason}" if isinstance(status, RunnerFailed) else "shut down"
        reason = f"runner {command.runner_id} on node {command.node_id} {what}"
        events.append(InstanceDeleted(instance_id=command.instance_id, reason=reason))
    return events


def _create_problem(cluster: InstanceCluster, instance: Instance) -> str | None:
    if instance.instance_id in cluster.instances:
        return f"instance id {instance.instance_id} is already in use"
    problems = []
    for shard in instance.shards:
        record = cluster.nodes.get(shard.node_id)
        if record is None or record.status != "active":
            problems.append(f"node {shard.node_id} is {'unknown' if record is None else 'timed out'}")
            continue
        free = _device_free_bytes(record, shard.device)
        if free is None:
            problems.append(f"node {shard.node_id} has no device {shard.device}")
            continue
        needed = shard.weight_bytes + shard.kv_cache_bytes + RUNNER_OVERHEAD_BYTES
        if needed > free:
            problems.append(
                f"node {shard.node_id} needs {format_bytes(needed)} on {shard.device}, has {format_bytes(free)} free"
            )
    return "; ".join(problems) or None


def _device_free_bytes(record: NodeRecord, device: str) -> int | None:
    """Free memory of `device` on the node, or None when the node has no such device."""
    profile = record.profile
    if device == "cpu" or (device == "mps" and "mps" in profile.backends):
        return profile.memory_available_bytes
    if not device.startswith("cuda:") or "cuda" not in profile.backends:
        return None
    index = int(device.removeprefix("cuda:"))
    gpu = next((gpu for gpu in profile.gpus if gpu.index == index), None)
    return None if gpu is None else gpu.memory_free_bytes

"""The master's instance decisions on plain data: place, create, delete, runner reports, node loss."""

from __future__ import annotations

from dataclasses import dataclass, field

from placement_helpers import CARD, GB, MB, cluster, make_node, request

from shoal.master.commands import Rejection
from shoal.master.instance_commands import decide_instance_command, instances_lost_with_node
from shoal.types.ids import NodeId
from shoal.types.instance_ids import InstanceId, RunnerId
from shoal.types.instance_messages import (
    CreateInstance,
    DeleteInstance,
    InstanceCreated,
    InstanceDeleted,
    PlaceInstance,
    ReportRunnerStatus,
    RunnerStatusChanged,
)
from shoal.types.instances import Instance
from shoal.types.runners import RunnerFailed, RunnerLoading, RunnerReady, RunnerShutdown, RunnerStatus
from shoal.types.state import NodeRecord

NEW = InstanceId("new1")


@dataclass
class Cluster:
    nodes: dict[NodeId, NodeRecord]
    instances: dict[InstanceId, Instance] = field(default_factory=dict)
    runners: dict[RunnerId, RunnerStatus] = field(default_factory=dict)


def two_nodes() -> Cluster:
    return Cluster(cluster(make_node("a", 1 * GB), make_node("b", 1 * GB, gpus=(200 * MB,))))


def placed(world: Cluster) -> Instance:
    result = decide_instance_command(world, PlaceInstance(model=CARD, request=request()), new_instance_id=NEW)
    assert isinstance(result, list), result
    (created,) = result
    assert isinstance(created, InstanceCreated)
    return created.instance


def test_place_becomes_instance_created() -> None:
    instance = placed(two_nodes())
    assert instance.instance_id == NEW and sorted(instance.node_ids) == ["a", "b"]


def test_place_uses_the_links_nodes_reported() -> None:
    nodes = cluster(*(make_node(n, 1000 * MB, rtts={}) for n in "abcd"))
    # memory order is a, b, c, d; its ring uses the two slow links a-b and c-d
    slow = {"a": {"b": 9.0, "c": 0.1, "d": 0.1}, "b": {"c": 0.1, "d": 0.1}, "c": {"d": 9.0}}
    for node_id, rtts in slow.items():
        profile = nodes[NodeId(node_id)].profile.model_copy(update={"link_rtts_ms": rtts})
        nodes[NodeId(node_id)] = nodes[NodeId(node_id)].model_copy(update={"profile": profile})
    result = decide_instance_command(
        Cluster(nodes), PlaceInstance(model=CARD, request=request(min_nodes=4)), new_instance_id=NEW
    )
    assert isinstance(result, list)
    assert result[0].instance.node_ids == ("a", "c", "b", "d")  # type: ignore[union-attr]


def test_impossible_placement_is_refused_with_the_reason_and_creates_nothing() -> None:
    world = Cluster(cluster(make_node("a", 100 * MB)))
    result = decide_instance_command(world, PlaceInstance(model=CARD, request=request()), new_instance_id=NEW)
    assert isinstance(result, Rejection) and "node a has 100.0 MB free" in result.reason
    nccl = decide_instance_command(
        two_nodes(),
        PlaceInstance(model=CARD, request=request(backend="nccl", min_nodes=2)),
        new_instance_id=NEW,
    )
    assert isinstance(nccl, Rejection) and "nodes without: a" in nccl.reason


def test_create_checks_id_nodes_devices_and_memory() -> None:
    world = two_nodes()
    instance = placed(world)
    assert decide_instance_command(world, CreateInstance(instance=instance), new_instance_id=NEW) == [
        InstanceCreated(instance=instance)
    ]
    world.instances[NEW] = instance
    taken = decide_instance_command(world, CreateInstance(instance=instance), new_instance_id=NEW)
    assert isinstance(taken, Rejection) and "already in use" in taken.reason
    world.instances.clear()
    timed_out = Cluster(cluster(make_node("a", 1 * GB, status="timed_out"), make_node("b", 1 * GB)))
    refused = decide_instance_command(timed_out, CreateInstance(instance=instance), new_instance_id=NEW)
    assert isinstance(refused, Rejection) and "node a is timed out" in refused.reason
    small = Cluster(cluster(make_node("a", 300 * MB), make_node("b", 1 * GB)))
    refused = decide_instance_command(small, CreateInstance(instance=instance), new_instance_id=NEW)
    assert (
        isinstance(refused, Rejection)
        and "node a needs" in refused.reason
        and "has 300.0 MB free" in refused.reason
    )
    on_gpu = instance.model_copy(
        update={"shards": (instance.shards[0].model_copy(update={"device": "cuda:3"}), *instance.shards[1:])}
    )
    refused = decide_instance_command(world, CreateInstance(instance=on_gpu), new_instance_id=NEW)
    assert isinstance(refused, Rejection) and "has no device cuda:3" in refused.reason


def test_delete_known_and_unknown_instances() -> None:
    world = two_nodes()
    world.instances[NEW] = placed(world)
    assert decide_instance_command(world, DeleteInstance(instance_id=NEW), new_instance_id=NEW) == [
        InstanceDeleted(instance_id=NEW, reason="deleted on request")
    ]
    unknown = decide_instance_command(
        world, DeleteInstance(instance_id=InstanceId("nope")), new_instance_id=NEW
    )
    assert isinstance(unknown, Rejection) and "unknown instance nope" in unknown.reason


def report(
    instance: Instance, rank: int, status: RunnerStatus, node: str | None = None
) -> ReportRunnerStatus:
    shard = instance.shards[rank]
    return ReportRunnerStatus(
        runner_id=shard.runner_id,
        instance_id=instance.instance_id,
        node_id=NodeId(node) if node else shard.node_id,
        status=status,
    )


def test_runner_reports_become_status_events_once() -> None:
    world = two_nodes()
    instance = placed(world)
    world.instances[NEW] = instance
    loading = RunnerLoading(layers_done=1, layers_total=6)
    events = decide_instance_command(world, report(instance, 0, loading), new_instance_id=NEW)
    assert events == [
        RunnerStatusChanged(
            runner_id=instance.shards[0].runner_id,
            instance_id=NEW,
            node_id=instance.shards[0].node_id,
            status=loading,
        )
    ]
    world.runners[instance.shards[0].runner_id] = loading
    assert decide_instance_command(world, report(instance, 0, loading), new_instance_id=NEW) == []
    assert len(decide_instance_command(world, report(instance, 0, RunnerReady()), new_instance_id=NEW)) == 1  # type: ignore[arg-type]


def test_a_failed_or_shut_down_runner_deletes_its_instance() -> None:
    world = two_nodes()
    instance = placed(world)
    world.instances[NEW] = instance
    failed = decide_instance_command(
        world, report(instance, 1, RunnerFailed(reason="signal 9")), new_instance_id=NEW
    )
    assert isinstance(failed, list) and len(failed) == 2
    assert failed[1] == InstanceDeleted(
        instance_id=NEW,
        reason=f"runner {instance.shards[1].runner_id} on node {instance.shards[1].node_id} failed: signal 9",
    )
    stopped = decide_instance_command(world, report(instance, 0, RunnerShutdown()), new_instance_id=NEW)
    assert isinstance(stopped, list) and isinstance(stopped[1], InstanceDeleted)
    assert stopped[1].reason.endswith("shut down")


def test_reports_about_unknown_instances_or_foreign_runners_are_refused() -> None:
    world = two_nodes()
    instance = placed(world)
    gone = decide_instance_command(world, report(instance, 0, RunnerReady()), new_instance_id=NEW)
    assert isinstance(gone, Rejection) and "unknown instance" in gone.reason
    world.instances[NEW] = instance
    other_node = "b" if instance.shards[0].node_id == "a" else "a"
    wrong = decide_instance_command(
        world, report(instance, 0, RunnerReady(), node=other_node), new_instance_id=NEW
    )
    assert isinstance(wrong, Rejection) and "is not a runner of instance" in wrong.reason


def test_a_timed_out_node_takes_its_instances_with_it() -> None:
    world = two_nodes()
    first = placed(world)
    instances = {NEW: first}
    assert instances_lost_with_node(instances, first.shards[1].node_id) == [
        InstanceDeleted(instance_id=NEW, reason=f"node {first.shards[1].node_id} timed out")
    ]
    assert instances_lost_with_node(instances, NodeId("zz")) == []

"""The worker's decisions: `plan(view, node_id, local_runners, now) -> Action | None`. Pure.

Inputs: the cluster's view of instances and runner statuses (the folded event log), this node's id, the
runner subprocesses this node supervises (with the status each last reported locally and since when),
and the current monotonic time. Output: the one next thing to do, or None when all is as it should be.
The worker's async loop carries the action out, then calls `plan` again; because each action moves the
world toward the view, repeating `plan` until None converges.

Priorities, first match wins (runners in id order, so the answer is deterministic):
1. A local runner whose instance is gone (deleted, or no longer assigning that runner to this node):
   shut it down, or forget it once its process has ended.
2. A local runner that overran its stage's deadline: fail it, naming the stage and the deadline.
3. A local runner whose status differs from what the cluster recorded: report it (loading progress only
   in steps of at least a tenth of the layers, so a load writes about ten events, not one per layer).
4. A local runner one of whose siblings failed: shut it down (the instance cannot serve any more; the
   master deletes it).
5. A shard of a live instance assigned to this node that has no local runner: spawn one, unless a
   sibling failed; if the cluster already recorded a live status for it, the process was lost (the node
   restarted), which is reported as a failure instead, since a new process cannot rejoin the group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shoal.types.ids import NodeId
from shoal.types.instance_ids import InstanceId, RunnerId
from shoal.types.instances import Instance, ShardAssignment
from shoal.types.runners import (
    RunnerConnected,
    RunnerConnecting,
    RunnerFailed,
    RunnerIdle,
    RunnerLoaded,
    RunnerLoading,
    RunnerShutdown,
    RunnerShuttingDown,
    RunnerStatus,
    RunnerWarmingUp,
    is_terminal,
)


class ClusterView(Protocol):
    """What the plan reads from the cluster state."""

    @property
    def instances(self) -> Mapping[InstanceId, Instance]: ...

    @property
    def runners(self) -> Mapping[RunnerId, RunnerStatus]: ...


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A plain ClusterView (the State gains these two fields when instances join the reducer)."""

    instances: Mapping[InstanceId, Instance] = field(default_factory=dict)
    runners: Mapping[RunnerId, RunnerStatus] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LocalRunner:
    """A runner subprocess this node supervises. `status_since`: monotonic time it entered the current
    stage (the status's kind; loading progress within the stage does not reset it)."""

    runner_id: RunnerId
    instance_id: InstanceId
    status: RunnerStatus
    status_since: float


@dataclass(frozen=True, slots=True)
class StageDeadlines:
    """Seconds a runner may stay in each stage. Ready and Running have none; terminal states need none."""

    idle: float = 30.0
    connecting: float = 120.0
    connected: float = 30.0
    loading: float = 900.0
    loaded: float = 30.0
    # with compiled decode, warm-up compiles three graphs: from a cold compile cache 37 s for the embedded
    # model on the 2-core dev box, 52 s for two ranks of a pipeline sharing it
    warming_up: float = 300.0
    shutting_down: float = 15.0

    def for_status(self, status: RunnerStatus) -> tuple[str, float] | None:
        stages: list[tuple[type, str, float]] = [
            (RunnerIdle, "start", self.idle),
            (RunnerConnecting, "connecting to the group", self.connecting),
            (RunnerConnected, "starting to load", self.connected),
            (RunnerLoading, "loading", self.loading),
            (RunnerLoaded, "starting warm-up", self.loaded),
            (RunnerWarmingUp, "warm-up", self.warming_up),
            (RunnerShuttingDown, "shutdown", self.shutting_down),
        ]
        return next(((name, limit) for cls, name, limit in stages if isinstance(status, cls)), None)


DEFAULT_DEADLINES = StageDeadlines()


@dataclass(frozen=True, slots=True)
class SpawnRunner:
    instance: Instance
    shard: ShardAssignment


@dataclass(frozen=True, slots=True)
class ShutdownRunner:
    """Ask the runner to stop (it reports ShuttingDown, then Shutdown)."""

    runner_id: RunnerId
    reason: str


@dataclass(frozen=True, slots=True)
class FailRunner:
    """Kill the runner's process and mark it Failed with `reason`."""

    runner_id: RunnerId
    reason: str


@dataclass(frozen=True, slots=True)
class ForgetRunner:
    """Drop an ended runner of a gone instance from the supervisor's table."""

    runner_id: RunnerId


@dataclass(frozen=True, slots=True)
class ReportStatus:
    """Send the master `ReportRunnerStatus` for this runner."""

    runner_id: RunnerId
    instance_id: InstanceId
    status: RunnerStatus


Action = SpawnRunner | ShutdownRunner | FailRunner | ForgetRunner | ReportStatus


def plan(
    view: ClusterView,
    node_id: NodeId,
    local_runners: Sequence[LocalRunner],
    now: float,
    deadlines: StageDeadlines = DEFAULT_DEADLINES,
) -> Action | None:
    local = sorted(local_runners, key=lambda runner: runner.runner_id)
    live: list[tuple[LocalRunner, Instance]] = []
    for runner in local:
        instance = view.instances.get(runner.instance_id)
        shard = instance.shard_on(node_id) if instance is not None else None
        if instance is None or shard is None or shard.runner_id != runner.runner_id:
            if is_terminal(runner.status):
                return ForgetRunner(runner.runner_id)
            if not isinstance(runner.status, RunnerShuttingDown):
                return ShutdownRunner(runner.runner_id, f"instance {runner.instance_id} was deleted")
        else:
            live.append((runner, instance))
    for runner in local:
        overrun = _overrun(runner, now, deadlines)
        if overrun is not None:
            return FailRunner(runner.runner_id, overrun)
    for runner, _ in live:
        if _should_report(runner.status, view.runners.get(runner.runner_id)):
            return ReportStatus(runner.runner_id, runner.instance_id, runner.status)
    for runner, instance in live:
        failed = _failed_sibling(view, instance, runner.runner_id)
        if (
            failed is not None
            and not is_terminal(runner.status)
            and not isinstance(runner.status, RunnerShuttingDown)
        ):
            return ShutdownRunner(runner.runner_id, failed)
    local_ids = {runner.runner_id for runner in local}
    for instance_id in sorted(view.instances):
        instance = view.instances[instance_id]
        shard = instance.shard_on(node_id)
        if shard is None or shard.runner_id in local_ids:
            continue
        recorded = view.runners.get(shard.runner_id)
        if recorded is not None and is_terminal(recorded):
            continue
        if recorded is not None and not isinstance(recorded, RunnerIdle):
            reason = f"runner process lost while {recorded.kind.removeprefix('runner_')} (its node restarted)"
            return ReportStatus(shard.runner_id, instance_id, RunnerFailed(reason=reason))
        if _failed_sibling(view, instance, shard.runner_id) is None:
            return SpawnRunner(instance, shard)
    return None


def _overrun(runner: LocalRunner, now: float, deadlines: StageDeadlines) -> str | None:
    stage = deadlines.for_status(runner.status)
    if stage is None:
        return None
    name, limit = stage
    if now - runner.status_since <= limit:
        return None
    detail = ""
    if isinstance(runner.status, RunnerLoading):
        detail = f" ({runner.status.layers_done} of {runner.status.layers_total} layers loaded)"
    return f"{name} did not finish within its deadline of {limit:g} s{detail}"


def _should_report(local: RunnerStatus, recorded: RunnerStatus | None) -> bool:
    if recorded is None:
        return True
    if local == recorded:
        return False
    if isinstance(local, RunnerLoading) and isinstance(recorded, RunnerLoading):
        step = max(1, local.layers_total // 10)
        return local.layers_done == local.layers_total or local.layers_done - recorded.layers_done >= step
    return True


def _failed_sibling(view: ClusterView, instance: Instance, runner_id: RunnerId) -> str | None:
    for shard in instance.shards:
        status = view.runners.get(shard.runner_id)
        if shard.runner_id != runner_id and isinstance(status, RunnerFailed | RunnerShutdown):
            verb = f"failed: {status.reason}" if isinstance(status, RunnerFailed) else "shut down"
            return f"sibling runner {shard.runner_id} on node {shard.node_id} {verb}"
    return None

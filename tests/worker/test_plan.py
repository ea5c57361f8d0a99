"""The worker's plan on plain data: what it spawns, stops, fails, reports and forgets, and in what order."""

from __future__ import annotations

from dataclasses import replace

from shoal.types.ids import NodeId
from shoal.types.instance_ids import InstanceId, RunnerId, runner_id_for
from shoal.types.instances import GroupAddress, Instance, ModelCard, ShardAssignment
from shoal.types.runners import (
    RunnerConnecting,
    RunnerFailed,
    RunnerIdle,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerShutdown,
    RunnerShuttingDown,
    RunnerStatus,
)
from shoal.worker.plan import (
    Action,
    FailRunner,
    ForgetRunner,
    LocalRunner,
    ReportStatus,
    ShutdownRunner,
    SpawnRunner,
    StageDeadlines,
    WorkerView,
    plan,
)

ME = NodeId("me")
OTHER = NodeId("other")
CARD = ModelCard(
    model_id="m",
    source="/m",
    architecture="LlamaForCausalLM",
    dtype="bfloat16",
    num_layers=4,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    vocab_size=100,
    context_length=256,
    tie_word_embeddings=False,
    layer_bytes=1000,
    embedding_bytes=100,
    head_bytes=100,
)


def make_instance(instance_id: str, nodes: tuple[str, ...] = ("me", "other")) -> Instance:
    iid = InstanceId(instance_id)
    per = CARD.num_layers // len(nodes)
    shards = tuple(
        ShardAssignment(
            node_id=NodeId(node),
            runner_id=runner_id_for(iid, rank),
            rank=rank,
            world_size=len(nodes),
            layer_start=rank * per,
            layer_end=CARD.num_layers if rank == len(nodes) - 1 else (rank + 1) * per,
            tp_rank=0,
            tp_size=1,
            device="cpu",
            weight_bytes=1,
            kv_cache_bytes=1,
        )
        for rank, node in enumerate(nodes)
    )
    return Instance(
        instance_id=iid,
        card=CARD,
        sharding="pipeline",
        backend="gloo",
        shards=shards,
        rendezvous=GroupAddress(host="127.0.0.1", port=29500),
    )


A = make_instance("a")  # me holds rank 0
B = make_instance("b", ("other", "me"))  # me holds rank 1
MINE_A = runner_id_for(A.instance_id, 0)
THEIRS_A = runner_id_for(A.instance_id, 1)
MINE_B = runner_id_for(B.instance_id, 1)


def view(*instances: Instance, runners: dict[RunnerId, RunnerStatus] | None = None) -> WorkerView:
    return WorkerView(instances={i.instance_id: i for i in instances}, runners=runners or {})


def local(runner_id: RunnerId, status: RunnerStatus, since: float = 0.0) -> LocalRunner:
    instance_id = InstanceId(runner_id.rsplit("-r", 1)[0])
    return LocalRunner(runner_id=runner_id, instance_id=instance_id, status=status, status_since=since)


def test_nothing_to_do_without_instances() -> None:
    assert plan(view(), ME, [], now=0.0) is None


def test_spawns_the_shard_assigned_to_this_node() -> None:
    action = plan(view(A), ME, [], now=0.0)
    assert action == SpawnRunner(A, A.shards[0])
    assert plan(view(A), ME, [], now=0.0) == action  # pure: same input, same answer


def test_ignores_instances_without_a_shard_here() -> None:
    elsewhere = make_instance("c", ("other",))
    assert plan(view(elsewhere), ME, [], now=0.0) is None


def test_shuts_down_runners_of_deleted_instances() -> None:
    action = plan(view(), ME, [local(MINE_A, RunnerReady())], now=0.0)
    assert action == ShutdownRunner(MINE_A, "instance a was deleted")


def test_waits_for_a_runner_that_is_shutting_down_then_forgets_it() -> None:
    assert plan(view(), ME, [local(MINE_A, RunnerShuttingDown(), since=0.0)], now=1.0) is None
    assert plan(view(), ME, [local(MINE_A, RunnerShutdown())], now=1.0) == ForgetRunner(MINE_A)
    assert plan(view(), ME, [local(MINE_A, RunnerFailed(reason="x"))], now=1.0) == ForgetRunner(MINE_A)


def test_a_runner_stuck_shutting_down_is_failed_at_its_deadline() -> None:
    stuck = [local(MINE_A, RunnerShuttingDown(), since=0.0)]
    action = plan(view(), ME, stuck, now=16.0)
    assert action == FailRunner(MINE_A, "shutdown did not finish within its deadline of 15 s")


def test_a_runner_no_longer_assigned_here_is_shut_down() -> None:
    moved = make_instance("a", ("other", "third"))
    action = plan(view(moved), ME, [local(MINE_A, RunnerReady())], now=0.0)
    assert isinstance(action, ShutdownRunner) and action.runner_id == MINE_A


def test_reports_a_status_the_cluster_has_not_recorded() -> None:
    runners = [local(MINE_A, RunnerConnecting())]
    action = plan(view(A), ME, runners, now=0.0)
    assert action == ReportStatus(MINE_A, A.instance_id, RunnerConnecting())
    recorded = view(A, runners={MINE_A: RunnerConnecting()})
    assert plan(recorded, ME, runners, now=0.0) is None


def test_loading_progress_is_reported_in_tenths() -> None:
    recorded = view(A, runners={MINE_A: RunnerLoading(layers_done=0, layers_total=30)})

    def act(done: int) -> Action | None:
        return plan(recorded, ME, [local(MINE_A, RunnerLoading(layers_done=done, layers_total=30))], now=0.0)

    assert act(0) is None
    assert act(2) is None
    assert act(3) == ReportStatus(MINE_A, A.instance_id, RunnerLoading(layers_done=3, layers_total=30))
    assert isinstance(act(30), ReportStatus)
    finished = view(A, runners={MINE_A: RunnerLoading(layers_done=30, layers_total=30)})
    done = local(MINE_A, RunnerLoading(layers_done=30, layers_total=30))
    assert plan(finished, ME, [done], now=0.0) is None


def test_running_task_count_changes_are_reported() -> None:
    recorded = view(A, runners={MINE_A: RunnerRunning(num_tasks=1)})
    action = plan(recorded, ME, [local(MINE_A, RunnerRunning(num_tasks=2))], now=0.0)
    assert action == ReportStatus(MINE_A, A.instance_id, RunnerRunning(num_tasks=2))


def test_stage_deadlines_fail_the_runner_with_the_stage_named() -> None:
    deadlines = StageDeadlines(loading=60.0)
    loading = RunnerLoading(layers_done=2, layers_total=4)
    recorded = view(A, runners={MINE_A: loading})
    runners = [local(MINE_A, loading, since=100.0)]
    assert plan(recorded, ME, runners, now=160.0, deadlines=deadlines) is None
    action = plan(recorded, ME, runners, now=160.5, deadlines=deadlines)
    assert action == FailRunner(
        MINE_A, "loading did not finish within its deadline of 60 s (2 of 4 layers loaded)"
    )


def test_serving_runners_have_no_deadline() -> None:
    recorded = view(A, runners={MINE_A: RunnerReady()})
    assert plan(recorded, ME, [local(MINE_A, RunnerReady(), since=0.0)], now=1e9) is None


def test_a_failed_sibling_shuts_this_runner_down() -> None:
    recorded = view(A, runners={MINE_A: RunnerReady(), THEIRS_A: RunnerFailed(reason="killed by signal 9")})
    action = plan(recorded, ME, [local(MINE_A, RunnerReady())], now=0.0)
    assert action == ShutdownRunner(
        MINE_A, f"sibling runner {THEIRS_A} on node other failed: killed by signal 9"
    )


def test_a_failed_local_runner_is_reported_not_shut_down() -> None:
    recorded = view(A, runners={MINE_A: RunnerReady()})
    crashed = RunnerFailed(reason="exited with code 1")
    assert plan(recorded, ME, [local(MINE_A, crashed)], now=0.0) == ReportStatus(
        MINE_A, A.instance_id, crashed
    )
    reported = view(A, runners={MINE_A: crashed})
    assert plan(reported, ME, [local(MINE_A, crashed)], now=0.0) is None  # the master deletes the instance


def test_no_spawn_into_an_instance_whose_sibling_failed() -> None:
    recorded = view(A, runners={THEIRS_A: RunnerFailed(reason="oom")})
    assert plan(recorded, ME, [], now=0.0) is None


def test_no_respawn_of_a_runner_that_ended() -> None:
    for status in (RunnerShutdown(), RunnerFailed(reason="x")):
        assert plan(view(A, runners={MINE_A: status}), ME, [], now=0.0) is None


def test_a_runner_lost_with_a_restart_is_reported_failed() -> None:
    recorded = view(A, runners={MINE_A: RunnerLoading(layers_done=1, layers_total=2)})
    action = plan(recorded, ME, [], now=0.0)
    assert action == ReportStatus(
        MINE_A, A.instance_id, RunnerFailed(reason="runner process lost while loading (its node restarted)")
    )
    # recorded Idle: the group never formed, so a new process can take its place
    assert plan(view(A, runners={MINE_A: RunnerIdle()}), ME, [], now=0.0) == SpawnRunner(A, A.shards[0])


def test_priorities_stop_before_report_before_spawn() -> None:
    runners = [local(MINE_B, RunnerConnecting()), local(runner_id_for(InstanceId("gone"), 0), RunnerReady())]
    first = plan(view(A, B), ME, runners, now=0.0)
    assert isinstance(first, ShutdownRunner) and first.runner_id == "gone-r0"
    second = plan(view(A, B), ME, runners[:1], now=0.0)
    assert second == ReportStatus(MINE_B, B.instance_id, RunnerConnecting())
    third = plan(view(A, B, runners={MINE_B: RunnerConnecting()}), ME, runners[:1], now=0.0)
    assert third == SpawnRunner(A, A.shards[0])


def test_plan_converges_when_its_actions_are_carried_out() -> None:
    """Carry each action out on a toy world (runners move to the next stage when spawned or stopped)
    until the plan has nothing left: every assigned shard runs, the deleted instance's runner is gone."""
    stale = make_instance("old")
    cluster_runners: dict[RunnerId, RunnerStatus] = {}
    locals_: dict[RunnerId, LocalRunner] = {
        runner_id_for(stale.instance_id, 0): local(runner_id_for(stale.instance_id, 0), RunnerReady())
    }
    world = view(A, B)
    for _ in range(20):
        action = plan(WorkerView(world.instances, dict(cluster_runners)), ME, list(locals_.values()), now=0.0)
        if action is None:
            break
        if isinstance(action, SpawnRunner):
            locals_[action.shard.runner_id] = local(action.shard.runner_id, RunnerReady())
        elif isinstance(action, ShutdownRunner):
            locals_[action.runner_id] = replace(locals_[action.runner_id], status=RunnerShutdown())
        elif isinstance(action, ForgetRunner):
            del locals_[action.runner_id]
        elif isinstance(action, ReportStatus):
            cluster_runners[action.runner_id] = action.status
        else:
            raise AssertionError(f"unexpected {action}")
    else:
        raise AssertionError("plan did not converge")
    assert set(locals_) == {MINE_A, MINE_B}
    assert cluster_runners == {MINE_A: RunnerReady(), MINE_B: RunnerReady()}

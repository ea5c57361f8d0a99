"""The runner supervisor with real runner processes: cancels, bad requests, a SIGKILL mid-stream, stage
deadlines, and no process left behind."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import anyio
import pytest

from shoal.engine.sampling import SamplingParams
from shoal.runner.messages import TaskChunk
from shoal.runner.spec import STALL_STAGE_ENV
from shoal.types.instance_ids import TaskId
from shoal.types.runners import RunnerFailed, RunnerLoading, RunnerShutdown, is_serving, is_terminal
from shoal.worker.plan import StageDeadlines
from shoal.worker.supervisor import RunnerSupervisor, SupervisorConfig, SupervisorError
from tests.runner.harness import instance_specs, reference, start_instance, task, tokens_of, wait_for
from tests.runner.tiny_model_dir import write_tiny_model_dir

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LONG = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
ENDLESS = SamplingParams(temperature=0, max_tokens=900, ignore_eos=True)


async def test_pipeline_cancel_bad_request_and_sigkill_mid_stream(tmp_path: Path) -> None:
    model = write_tiny_model_dir(tmp_path / "model", "llama", max_position_embeddings=1024)
    prompts = ["first prompt", "second prompt", "third prompt"]
    specs = instance_specs(model, "pipeline", 2, splits=(2,), kv_cache_bytes=8 << 20)
    rank0, rank1 = specs
    async with RunnerSupervisor() as supervisor:
        await start_instance(supervisor, specs)
        expected = reference(model, prompts, LONG)

        # Cancel one of three: it ends with "abort", the other two give exactly their unbatched tokens.
        streams = [supervisor.submit(rank0.runner_id, task(f"c{i}", p, LONG)) for i, p in enumerate(prompts)]
        results: list[list[TaskChunk]] = [[], [], []]

        async def drain(index: int) -> None:
            with anyio.fail_after(60):
                async for chunk in streams[index]:
                    results[index].append(chunk)
                    if index == 1 and len(results[1]) == 2:
                        assert supervisor.cancel(TaskId("c1"))

        async with anyio.create_task_group() as group:
            for index in range(3):
                group.start_soon(drain, index)
        assert results[1][-1].finish_reason == "abort" and len(tokens_of(results[1])) < LONG.max_tokens
        for index in (0, 2):
            assert tokens_of(results[index]) == list(expected[index].token_ids)
        assert not supervisor.cancel(TaskId("c1"))  # finished tasks are unknown

        # A bad request is an error chunk for that request alone; the runner keeps serving.
        bad = [c async for c in supervisor.submit(rank0.runner_id, task("bad", [1, 2, 999], LONG))]
        assert len(bad) == 1 and bad[0].error is not None and "[0, 256)" in bad[0].error
        with pytest.raises(SupervisorError, match="rank 1: tasks go to rank 0"):
            supervisor.submit(rank1.runner_id, task("x", "hi", LONG))

        # SIGKILL the sampling rank while it streams: the request errors at once, both ranks end.
        stream = supervisor.submit(rank0.runner_id, task("doomed", "stream for a long time", ENDLESS))
        chunks = [await anext(stream)]
        pid = supervisor._runners[rank1.runner_id].process.pid
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with anyio.fail_after(2):
            async for chunk in stream:
                chunks.append(chunk)
        assert time.monotonic() - killed_at < 2
        assert chunks[-1].error is not None and "killed by SIGKILL" in chunks[-1].error
        assert all(c.error is None for c in chunks[:-1])
        status = supervisor.status(rank1.runner_id)
        assert isinstance(status, RunnerFailed) and "killed by SIGKILL while running" in status.reason
        # Rank 0 loses its peer in the next collective and fails too, with its own reason.
        await wait_for(lambda: is_terminal(supervisor.status(rank0.runner_id)), 10, "rank 0 to end")
        assert isinstance(supervisor.status(rank0.runner_id), RunnerFailed)
        with pytest.raises(SupervisorError, match="not serving"):
            supervisor.submit(rank0.runner_id, task("late", "hi", LONG))
    processes = [supervisor._runners[s.runner_id].process for s in specs]
    assert all(p.returncode is not None for p in processes)  # reaped, not zombies


async def test_stuck_runners_fail_at_their_stage_deadlines(tmp_path: Path) -> None:
    """One runner hangs on entering loading and overruns the loading deadline. Another serves, is frozen
    (SIGSTOP: it cannot read a stop request), is asked to shut down, and is killed at the shutting-down
    deadline. Both are reaped."""
    model = write_tiny_model_dir(tmp_path / "model", "llama")
    (stuck,) = instance_specs(model, "pipeline", 1, instance="stuck")
    (frozen,) = instance_specs(model, "pipeline", 1, instance="frozen")
    config = SupervisorConfig(deadlines=StageDeadlines(loading=1.5, shutting_down=1.0))
    async with RunnerSupervisor(config) as supervisor:
        await supervisor.spawn(stuck, env={STALL_STAGE_ENV: "loading"})
        await supervisor.spawn(frozen)
        await wait_for(lambda: is_serving(supervisor.status(frozen.runner_id)), 60, "a serving runner")
        await wait_for(lambda: isinstance(supervisor.status(stuck.runner_id), RunnerLoading), 60, "loading")
        loading_since = supervisor._runners[stuck.runner_id].status_since
        os.kill(supervisor._runners[frozen.runner_id].process.pid, signal.SIGSTOP)
        asked = time.monotonic()
        with anyio.fail_after(10):
            stop_status = await supervisor.shutdown(frozen.runner_id)
        stop_elapsed = time.monotonic() - asked
        await wait_for(lambda: is_terminal(supervisor.status(stuck.runner_id)), 10, "the loading deadline")
        load_elapsed = time.monotonic() - loading_since
        load_status = supervisor.status(stuck.runner_id)
        local = {runner.runner_id: runner.status for runner in supervisor.runners()}
        processes = [supervisor._runners[r].process for r in (stuck.runner_id, frozen.runner_id)]
    assert 1.5 <= load_elapsed < 4 and 1.0 <= stop_elapsed < 3
    assert isinstance(load_status, RunnerFailed)
    assert load_status.reason == "loading did not finish within its deadline of 1.5 s (0 of 3 layers loaded)"
    assert stop_status == RunnerFailed(reason="shutdown did not finish within its deadline of 1 s")
    assert local == {stuck.runner_id: load_status, frozen.runner_id: stop_status}
    assert [p.returncode for p in processes] == [-signal.SIGKILL, -signal.SIGKILL]


async def test_a_stop_ends_a_starting_runner_at_once(tmp_path: Path) -> None:
    """Rank 0 of a 2-rank instance whose rank 1 never comes waits in the rendezvous, holding the instance's
    port; another runner hangs in loading. Neither could read a stop request before its stage returns.
    A stop ends both at once (Shutdown, not Failed, long before any deadline), and the port is free."""
    model = write_tiny_model_dir(tmp_path / "model", "llama")
    waiting, _ = instance_specs(model, "pipeline", 2, splits=(2,), instance="waiting", group_timeout_s=60.0)
    (loading,) = instance_specs(model, "pipeline", 1, instance="loading")
    port = waiting.rendezvous.port
    config = SupervisorConfig(deadlines=StageDeadlines(connecting=60, loading=60, shutting_down=30))
    async with RunnerSupervisor(config) as supervisor:
        await supervisor.spawn(waiting)
        await supervisor.spawn(loading, env={STALL_STAGE_ENV: "loading"})
        await wait_for(lambda: _listening(port), 60, "rank 0 to host the rendezvous")
        await wait_for(lambda: isinstance(supervisor.status(loading.runner_id), RunnerLoading), 60, "loading")
        asked = time.monotonic()
        with anyio.fail_after(5):
            statuses = [await supervisor.shutdown(s.runner_id) for s in (waiting, loading)]
        elapsed = time.monotonic() - asked
        with socket.create_server(("127.0.0.1", port)):  # rank 0's rendezvous port is free again
            pass
    assert statuses == [RunnerShutdown(), RunnerShutdown()]
    assert elapsed < 2


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True

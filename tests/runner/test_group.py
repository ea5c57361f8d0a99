"""The per-step protocol between real processes over gloo.

Tensor parallel: one all-reduce carries a short delta, a long one follows in a broadcast, any rank's
stop reaches all, and ranks that sampled different tokens fail.
Pipeline (3 ranks, so a middle rank forwards): rank 0's delta travels along the stages, the last rank's
tokens reach every rank, and any rank's stop reaches all at the step's end, in a step that sampled and
in one that did not; over the socket mesh (CPU instances) and over plain torch.distributed sends (the
path NCCL instances take)."""

from __future__ import annotations

import multiprocessing
import queue
from typing import Any

import pytest

from shoal.runner.group import (
    INLINE_PAYLOAD_BYTES,
    RankDivergenceError,
    StepChannel,
    open_channel,
    start_group,
    stop_group,
)
from shoal.runner.spec import RunnerSpec
from tests.runner.harness import free_port

pytestmark = pytest.mark.slow

LONG = bytes(range(256)) * (INLINE_PAYLOAD_BYTES // 256 * 3 + 1)
PAYLOADS = (b"", b'[["add", "t1"]]', LONG, b"x" * INLINE_PAYLOAD_BYTES)


def _tensor_rank(spec: RunnerSpec) -> list[Any]:
    channel = StepChannel(spec)
    got: list[Any] = []
    for payload in PAYLOADS:
        # Only rank 0's payload counts: the others pass their own, which must be ignored.
        got.append(channel.begin_step(payload if spec.rank == 0 else b"ignored", False))
        got.append(channel.end_step())
    got.append(channel.begin_step(b"", spec.rank == 1))  # a stop wished by rank 1 alone
    channel.note_sampled([5, 6])
    got.append(channel.exchange(b"", False))  # the same tokens: fine
    channel.note_sampled([5, 6 + spec.rank])
    try:
        channel.exchange(b"", False)
        got.append("no divergence seen")
    except RankDivergenceError as exc:
        got.append(str(exc))
    return got


def _pipeline_rank(spec: RunnerSpec, store: Any, use_mesh: bool) -> list[Any]:
    channel = open_channel(spec, store) if use_mesh else StepChannel(spec)
    last = spec.world_size - 1
    got: list[Any] = []
    for payload in PAYLOADS:
        got.append(channel.begin_step(payload if spec.rank == 0 else b"ignored", False))
        sampled = [7, 8] if spec.rank == last else None
        got.append(channel.share_tokens(sampled, 2))
        got.append(channel.end_step())
    for stopping in range(spec.world_size):  # each rank's stop wish, in a step that samples nothing
        channel.begin_step(b"", spec.rank == stopping)
        got.append(channel.end_step())
    channel.begin_step(b"", spec.rank == 1)  # and in one that samples
    got.append(channel.share_tokens([9] if spec.rank == last else None, 1))
    got.append(channel.end_step())
    return got


def _rank(spec: RunnerSpec, results: Any, role: str) -> None:
    try:
        store = start_group(spec)
        if role == "tensor":
            got = _tensor_rank(spec)
        else:
            got = _pipeline_rank(spec, store, use_mesh=role == "pipeline-mesh")
        results.put((spec.rank, got))
    except Exception as exc:  # the top of the process: the test reads the failure
        results.put((spec.rank, f"{type(exc).__name__}: {exc}"))
    finally:
        stop_group()


def _specs(sharding: str, world_size: int) -> list[RunnerSpec]:
    port = free_port()
    tensor = sharding == "tensor"
    return [
        RunnerSpec.model_validate(
            {
                "runner_id": f"inst-{rank}",
                "instance_id": "inst",
                "sharding": sharding,
                "backend": "gloo",
                "rank": rank,
                "world_size": world_size,
                "layer_start": 0 if tensor else rank,
                "layer_end": 1 if tensor else rank + 1,
                "tp_rank": rank if tensor else 0,
                "tp_size": world_size if tensor else 1,
                "device": "cpu",
                "rendezvous": {"host": "127.0.0.1", "port": port},
                "model_path": "unused",
                "group_timeout_s": 20.0,
            }
        )
        for rank in range(world_size)
    ]


def _run(specs: list[RunnerSpec], role: str) -> dict[int, list[Any]]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank, args=(spec, results, role)) for spec in specs]
    for process in processes:
        process.start()
    try:
        answers = dict(results.get(timeout=60) for _ in processes)
    except queue.Empty:
        pytest.fail("a rank did not answer within 60 s")
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    for got in answers.values():
        assert isinstance(got, list), got
    return answers


def test_tensor_parallel_exchange_over_two_processes() -> None:
    answers = _run(_specs("tensor", 2), "tensor")
    for rank in (0, 1):
        got = answers[rank]
        expected: list[Any] = []
        for payload in PAYLOADS:
            expected += [(payload, False), False]
        assert got[:8] == expected
        assert got[8] == (b"", True)  # agreed before the step
        assert got[9] == (b"", False)
        assert "sampled different tokens" in got[10]


@pytest.mark.parametrize("role", ["pipeline-mesh", "pipeline-dist"])
def test_pipeline_chain_over_three_processes(role: str) -> None:
    answers = _run(_specs("pipeline", 3), role)
    expected: list[Any] = []
    for payload in PAYLOADS:
        # every rank gets rank 0's payload; the stop is agreed at the step's end, not before it
        expected += [(payload, False), [7, 8], False]
    expected += [True, True, True]  # rank 0's, the middle rank's and the last rank's wish reach all
    expected += [[9], True]
    for rank in range(3):
        assert answers[rank] == expected, f"rank {rank}"

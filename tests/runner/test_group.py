"""The step exchange between two real processes over gloo: one all-reduce carries a short delta, a long one
follows in a broadcast, any rank's stop reaches all, and ranks that sampled different tokens fail."""

from __future__ import annotations

import multiprocessing
import queue
from typing import Any

import pytest

from shoal.runner.group import INLINE_PAYLOAD_BYTES, RankDivergenceError, StepChannel, start_group, stop_group
from shoal.runner.spec import RunnerSpec
from tests.runner.harness import free_port

pytestmark = pytest.mark.slow

LONG = bytes(range(256)) * (INLINE_PAYLOAD_BYTES // 256 * 3 + 1)


def _rank(spec: RunnerSpec, results: Any) -> None:
    try:
        start_group(spec)
        channel = StepChannel(spec)
        got: list[Any] = []
        for payload in (b"", b'[["add", "t1"]]', LONG, b"x" * INLINE_PAYLOAD_BYTES):
            # Only rank 0's payload counts: the others pass their own, which must be ignored.
            got.append(channel.exchange(payload if spec.rank == 0 else b"ignored", False))
        got.append(channel.exchange(b"", spec.rank == 1))  # a stop wished by rank 1 alone
        channel.note_sampled([5, 6])
        got.append(channel.exchange(b"", False))  # the same tokens: fine
        channel.note_sampled([5, 6 + spec.rank])
        try:
            channel.exchange(b"", False)
            got.append("no divergence seen")
        except RankDivergenceError as exc:
            got.append(str(exc))
        results.put((spec.rank, got))
    except Exception as exc:  # the top of the process: the test reads the failure
        results.put((spec.rank, f"{type(exc).__name__}: {exc}"))
    finally:
        stop_group()


def test_exchange_over_two_processes() -> None:
    port = free_port()
    specs = [
        RunnerSpec.model_validate(
            {
                "runner_id": f"inst-{rank}",
                "instance_id": "inst",
                "sharding": "tensor",
                "backend": "gloo",
                "rank": rank,
                "world_size": 2,
                "layer_start": 0,
                "layer_end": 1,
                "tp_rank": rank,
                "tp_size": 2,
                "device": "cpu",
                "rendezvous": {"host": "127.0.0.1", "port": port},
                "model_path": "unused",
                "group_timeout_s": 20.0,
            }
        )
        for rank in range(2)
    ]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank, args=(spec, results)) for spec in specs]
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
    for rank in (0, 1):
        got = answers[rank]
        assert isinstance(got, list), got
        assert got[:4] == [
            (b"", False),
            (b'[["add", "t1"]]', False),
            (LONG, False),
            (b"x" * INLINE_PAYLOAD_BYTES, False),
        ]
        assert got[4] == (b"", True)
        assert got[5] == (b"", False)
        assert "sampled different tokens" in got[6]

"""Helpers for tests that run real runner processes under a real supervisor on loopback."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import torch

from shoal.engine.llm_engine import CompletedRequest, load_engine
from shoal.engine.sampling import SamplingParams
from shoal.runner.messages import SubmitTask, TaskChunk, TaskPrompt
from shoal.runner.spec import RunnerSpec, compute_dtype
from shoal.types.instance_ids import InstanceId, RunnerId, TaskId, runner_id_for
from shoal.types.instances import GroupAddress, Sharding
from shoal.types.runners import RunnerStatus, is_serving, is_terminal
from shoal.worker.supervisor import RunnerSupervisor

TEST_SETTINGS: dict[str, object] = {
    "dtype": "float32",
    "kv_cache_bytes": 4 << 20,
    "block_size": 4,
    "num_threads": 1,
    "group_timeout_s": 20.0,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def instance_specs(
    model: Path,
    sharding: Sharding,
    world_size: int,
    *,
    num_layers: int = 3,
    splits: Sequence[int] = (),
    instance: str = "inst",
    **settings: object,
) -> list[RunnerSpec]:
    """Specs of every rank of one instance. Pipeline stages split the layers at `splits`."""
    bounds = [0, *splits, num_layers] if sharding == "pipeline" else []
    assert sharding == "tensor" or len(bounds) == world_size + 1
    rendezvous = GroupAddress(host="127.0.0.1", port=free_port())
    specs = []
    for rank in range(world_size):
        pipeline = sharding == "pipeline"
        specs.append(
            RunnerSpec.model_validate(
                {
                    "runner_id": runner_id_for(InstanceId(instance), rank),
                    "instance_id": instance,
                    "sharding": sharding,
                    "backend": "gloo",
                    "rank": rank,
                    "world_size": world_size,
                    "layer_start": bounds[rank] if pipeline else 0,
                    "layer_end": bounds[rank + 1] if pipeline else num_layers,
                    "tp_rank": 0 if pipeline else rank,
                    "tp_size": 1 if pipeline else world_size,
                    "device": "cpu",
                    "rendezvous": rendezvous,
                    "model_path": str(model),
                    **TEST_SETTINGS,
                    **settings,
                },
                strict=False,
            )
        )
    return specs


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await anyio.sleep(0.02)


async def start_instance(
    supervisor: RunnerSupervisor, specs: Sequence[RunnerSpec], timeout: float = 60
) -> None:
    for spec in specs:
        await supervisor.spawn(spec)
    ids = [spec.runner_id for spec in specs]

    def statuses() -> list[RunnerStatus]:
        return [supervisor.status(runner_id) for runner_id in ids]

    await wait_for(lambda: all(is_serving(s) or is_terminal(s) for s in statuses()), timeout, "runners ready")
    assert all(is_serving(s) for s in statuses()), statuses()


async def collect(
    supervisor: RunnerSupervisor, runner_id: RunnerId, task: SubmitTask, timeout: float = 60
) -> list[TaskChunk]:
    chunks: list[TaskChunk] = []
    with anyio.fail_after(timeout):
        async for chunk in supervisor.submit(runner_id, task):
            chunks.append(chunk)
    return chunks


def task(task_id: str, prompt: TaskPrompt, params: SamplingParams) -> SubmitTask:
    return SubmitTask(TaskId(task_id), prompt, params)


def tokens_of(chunks: Sequence[TaskChunk]) -> list[int]:
    return [t for chunk in chunks for t in chunk.token_ids]


def reference(
    model: Path,
    prompts: Sequence[TaskPrompt],
    params: SamplingParams,
    quant: str = "none",
    dtype: torch.dtype | None = None,
) -> list[CompletedRequest]:
    """The same prompts on one process (the engine alone), with weights quantized as `quant`, in `dtype`
    (default: what an instance's runners compute in: fp32 for this fp32 model unquantized, else bf16)."""
    dtype = dtype or getattr(torch, compute_dtype("float32", quant))
    engine = load_engine(model, dtype=dtype, kv_cache_bytes=4 << 20, quant=quant)
    return engine.generate(list(prompts), params)  # type: ignore[arg-type]

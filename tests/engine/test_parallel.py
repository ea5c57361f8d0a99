"""Sharded equals unsplit: tensor parallel (2 ranks in 2 threads) and two pipeline stages, in one process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from shoal.engine.batch import ScheduledChunk
from shoal.engine.config import ModelConfig
from shoal.engine.model_runner import ModelRunner
from shoal.engine.parallel import ShardSpec, SingleProcessCommunicator
from tests.engine.tiny_models import tiny_hf_config, write_tiny_model

STEPS = [
    [ScheduledChunk(0, (5, 17, 200, 33, 4, 99, 150), 0, (2, 0), sample=True)],
    [
        ScheduledChunk(0, (61,), 7, (2, 0), sample=True),
        ScheduledChunk(1, (8, 9, 10, 11, 12), 0, (1, 3), sample=True),
    ],
    [ScheduledChunk(0, (62,), 8, (2, 0, 4), sample=True), ScheduledChunk(1, (13,), 5, (1, 3), sample=True)],
]


class ThreadCommunicator:
    """All-reduce between threads of one process: each rank posts its tensor, all wait, all sum."""

    def __init__(self, rank: int, slots: list[torch.Tensor | None], barrier: threading.Barrier) -> None:
        self._rank = rank
        self._slots = slots
        self._barrier = barrier

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return len(self._slots)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._slots[self._rank] = tensor.clone()
        self._barrier.wait(timeout=30)
        total = torch.stack([t for t in self._slots if t is not None]).sum(0)
        self._barrier.wait(timeout=30)  # nobody overwrites a slot before everyone has summed
        return tensor.copy_(total)


def make_runner(path: Path, **kwargs: object) -> ModelRunner:
    return ModelRunner(path, dtype=torch.float32, kv_cache_bytes=1 << 20, block_size=4, **kwargs)  # type: ignore[arg-type]


def run_steps(runner_step: Callable[[list[ScheduledChunk]], torch.Tensor]) -> list[torch.Tensor]:
    return [runner_step(step) for step in STEPS]


def in_threads(functions: list[Callable[[], list[torch.Tensor]]]) -> list[list[torch.Tensor]]:
    results: list[list[torch.Tensor]] = [[] for _ in functions]
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            results[i] = functions[i]()
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(functions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return results


@pytest.mark.parametrize(
    ("arch", "overrides"), [("qwen2", {}), ("smollm", {"vocab_size": 255}), ("qwen3", {})]
)
def test_tensor_parallel_two_ranks_equal_unsplit(
    tmp_path: Path, arch: str, overrides: dict[str, int]
) -> None:
    write_tiny_model(tmp_path, arch, **overrides)
    expected = run_steps(make_runner(tmp_path).execute)
    slots: list[torch.Tensor | None] = [None, None]
    barrier = threading.Barrier(2)
    ranks = [
        make_runner(
            tmp_path,
            shard=ShardSpec(tp_rank=r, tp_size=2),
            communicator=ThreadCommunicator(r, slots, barrier),
        )
        for r in range(2)
    ]
    assert ranks[0].model.layers[0].self_attn.qkv_proj.weight.shape[0] == expected_qkv_rows(tmp_path) // 2
    results = in_threads([lambda runner=runner: run_steps(runner.execute) for runner in ranks])
    for rank_logits in results:
        for got, want in zip(rank_logits, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def expected_qkv_rows(path: Path) -> int:
    config = ModelConfig.from_hf_dir(path)
    return (config.num_heads + 2 * config.num_kv_heads) * config.head_dim


@pytest.mark.parametrize(("arch", "split"), [("llama", 1), ("llama", 2), ("smollm", 2)])
def test_two_pipeline_stages_equal_unsplit(tmp_path: Path, arch: str, split: int) -> None:
    """smollm: tied embeddings, so the last stage reads its head from the embedding tensor."""
    write_tiny_model(tmp_path, arch)
    expected = run_steps(make_runner(tmp_path).execute)
    first = make_runner(tmp_path, shard=ShardSpec(layer_end=split))
    last = make_runner(tmp_path, shard=ShardSpec(layer_start=split))
    assert first.model.lm_head is None and last.model.embed_tokens is None
    assert len(first.model.layers) + len(last.model.layers) == 3

    def pipeline_step(step: list[ScheduledChunk]) -> torch.Tensor:
        hidden = first.execute(step)
        assert hidden.shape == (sum(len(c.token_ids) for c in step), 64)
        return last.execute(step, hidden_states=hidden)

    for got, want in zip(run_steps(pipeline_step), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shard_spec_validation() -> None:
    config = ModelConfig.from_hf_dict(tiny_hf_config("llama").to_dict())  # 4 heads, 2 kv heads, 3 layers
    assert ShardSpec().resolve(config).layer_end == 3
    assert ShardSpec(layer_start=1, layer_end=3).resolve(config).is_last_stage(3)
    assert not ShardSpec(layer_start=1, layer_end=2).is_first_stage
    with pytest.raises(ValueError, match="must divide"):
        ShardSpec(tp_rank=0, tp_size=4).resolve(config)  # 2 kv heads
    with pytest.raises(ValueError, match="outside a group"):
        ShardSpec(tp_rank=2, tp_size=2).resolve(config)
    with pytest.raises(ValueError, match="layer range"):
        ShardSpec(layer_start=2, layer_end=5).resolve(config)
    with pytest.raises(ValueError, match="layer range"):
        ShardSpec(layer_start=2, layer_end=2).resolve(config)


def test_runner_checks_communicator_against_shard(tmp_path: Path) -> None:
    write_tiny_model(tmp_path, "llama")
    with pytest.raises(ValueError, match="needs a communicator"):
        make_runner(tmp_path, shard=ShardSpec(tp_rank=0, tp_size=2))
    with pytest.raises(ValueError, match="does not match"):
        make_runner(tmp_path, shard=ShardSpec(tp_rank=1, tp_size=2), communicator=SingleProcessCommunicator())


def test_torch_distributed_communicator_sums_in_place(tmp_path: Path) -> None:
    import torch.distributed as dist

    from shoal.engine.parallel import TorchDistributedCommunicator

    with pytest.raises(RuntimeError, match="not initialised"):
        TorchDistributedCommunicator()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        comm = TorchDistributedCommunicator()
        assert (comm.rank, comm.world_size) == (0, 1)
        tensor = torch.tensor([1.0, 2.0])
        assert comm.all_reduce(tensor) is tensor
        torch.testing.assert_close(tensor, torch.tensor([1.0, 2.0]))
    finally:
        dist.destroy_process_group()


def _tp_rank_main(rank: int, path: str, store: str, out: str) -> None:
    """One tensor-parallel rank in its own process (gloo over a file store); saves its logits."""
    import torch.distributed as dist

    from shoal.engine.parallel import TorchDistributedCommunicator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        runner = make_runner(
            Path(path), shard=ShardSpec(tp_rank=rank, tp_size=2), communicator=TorchDistributedCommunicator()
        )
        torch.save(run_steps(runner.execute), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_across_two_processes_with_gloo(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    write_tiny_model(tmp_path / "model", "qwen2")
    expected = run_steps(make_runner(tmp_path / "model").execute)
    args = (str(tmp_path / "model"), str(tmp_path / "store"), str(tmp_path / "logits"))
    context = mp.spawn(_tp_rank_main, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        assert time.monotonic() < deadline, "tensor-parallel ranks did not finish"
    for rank in range(2):
        for got, want in zip(torch.load(tmp_path / f"logits.{rank}"), expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

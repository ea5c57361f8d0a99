"""Our Llama-family model code against transformers' on the same tiny random weights (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shoal.engine.batch import ScheduledChunk
from shoal.engine.model_runner import ModelRunner
from tests.engine.tiny_models import ARCHS, write_tiny_model

ATOL = 1e-4
BLOCK_SIZE = 4
# Deliberately scattered, non-monotonic block ids: slots must follow the table, not the position.
BLOCK_TABLE = (7, 2, 9, 0, 5, 11, 3, 1)


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp(request.param)
    hf_model = write_tiny_model(path, request.param)
    return path, hf_model


def make_runner(path: Path) -> ModelRunner:
    return ModelRunner(path, dtype=torch.float32, kv_cache_bytes=1 << 20, block_size=BLOCK_SIZE)


def hf_logits(hf_model: object, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0]  # type: ignore[operator]


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_chunks(runner: ModelRunner, token_ids: list[int], sizes: list[int]) -> list[torch.Tensor]:
    """Feed `token_ids` as consecutive chunks of the given sizes; the logits after each chunk."""
    outputs, start = [], 0
    for size in sizes:
        chunk = ScheduledChunk(0, tuple(token_ids[start : start + size]), start, BLOCK_TABLE, sample=True)
        outputs.append(runner.execute([chunk])[0])
        start += size
    return outputs


def test_single_prefill_matches_transformers(tiny: tuple[Path, object]) -> None:
    path, hf_model = tiny
    ids = prompt(13)
    (logits,) = run_chunks(make_runner(path), ids, [13])
    torch.testing.assert_close(logits, hf_logits(hf_model, ids)[-1], atol=ATOL, rtol=0)


def test_prefill_then_decode_matches_transformers(tiny: tuple[Path, object]) -> None:
    path, hf_model = tiny
    ids = prompt(14, seed=2)
    outputs = run_chunks(make_runner(path), ids, [9, 1, 1, 1, 1, 1])
    expected = hf_logits(hf_model, ids)
    for got, pos in zip(outputs, [8, 9, 10, 11, 12, 13], strict=True):
        torch.testing.assert_close(got, expected[pos], atol=ATOL, rtol=0)


def test_chunked_prefill_matches_transformers(tiny: tuple[Path, object]) -> None:
    path, hf_model = tiny
    ids = prompt(19, seed=3)
    outputs = run_chunks(make_runner(path), ids, [6, 5, 8])
    expected = hf_logits(hf_model, ids)
    for got, pos in zip(outputs, [5, 10, 18], strict=True):
        torch.testing.assert_close(got, expected[pos], atol=ATOL, rtol=0)


def test_weight_kernel_hook_replaces_every_matmul(tmp_path: Path) -> None:
    """The quantization contract: `set_weight_kernel` routes the product and frees `.weight`."""
    from shoal.engine.layers import LinearBase, ParallelLMHead

    hf_model = write_tiny_model(tmp_path, "qwen2")
    runner = make_runner(tmp_path)
    calls: list[str] = []

    def kernel_for(name: str, weight: torch.Tensor) -> object:
        held = weight.detach().clone()  # the kernel owns its copy of W

        def kernel(x: torch.Tensor) -> torch.Tensor:
            calls.append(name)
            return x @ held.T

        return kernel

    for name, module in runner.model.named_modules():
        if isinstance(module, LinearBase | ParallelLMHead):
            assert module.weight is not None
            module.set_weight_kernel(kernel_for(name, module.weight))  # type: ignore[arg-type]
            if isinstance(module, LinearBase):
                assert module.weight is None
    ids = prompt(7, seed=4)
    (logits,) = run_chunks(runner, ids, [7])
    torch.testing.assert_close(logits, hf_logits(hf_model, ids)[-1], atol=ATOL, rtol=0)
    assert len(set(calls)) == 3 * 4 + 1  # qkv, o, gate_up, down per layer, and the head

"""Placement's weight bytes for a shard (shoal.master.shard_memory) against what a runner's loaded, quantized
shard really holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from shoal.engine.layers import LinearBase, ParallelLMHead
from shoal.engine.loader import load_config, load_model
from shoal.engine.parallel import ShardSpec
from shoal.engine.quant import QuantizationSummary, quantize_model
from shoal.master.model_card import model_card_from_config
from shoal.master.shard_memory import layer_bytes, matmul_bytes, stage_weight_bytes
from shoal.types.instances import ModelCard
from tests.engine.tiny_models import write_tiny_model


def held_bytes(model: nn.Module, summary: QuantizationSummary) -> int:
    """What the loaded shard holds in weights: every parameter still there (a tied head's tensor is the
    embedding's, counted once), plus the quantized kernels (the summary's matmul bytes after, less the
    weights it left in the model dtype, which are parameters already)."""
    parameters = {id(p): p.nbytes for p in model.parameters()}
    left_float = sum(
        module.weight.nbytes
        for name, module in model.named_modules()
        if summary.formats.get(name) == "none" and isinstance(module, LinearBase | ParallelLMHead)
    )
    return sum(parameters.values()) + summary.weight_bytes_after - left_float


def card_for(path: Path) -> ModelCard:
    return model_card_from_config(load_config(path), model_id="tiny", source=str(path), dtype="float32")


@pytest.fixture(scope="module", params=["llama", "smollm"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch: str = request.param  # smollm ties its embeddings
    path = tmp_path_factory.mktemp(arch) / arch
    write_tiny_model(path, arch)
    return path


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
@pytest.mark.parametrize(("start", "end"), [(0, 3), (0, 1), (1, 3)])
def test_stage_weight_bytes_match_a_loaded_quantized_stage(
    tiny: Path, quant: str, start: int, end: int
) -> None:
    card = card_for(tiny)
    model = load_model(tiny, ShardSpec(0, 1, start, end), torch.float32, torch.device("cpu"))
    summary = quantize_model(model, quant)
    if quant != "none":
        assert set(summary.formats.values()) == {quant}  # the tiny shapes take either kernel
    actual = held_bytes(model, summary)
    assert stage_weight_bytes(card, start, end, 1, quant) == actual  # type: ignore[arg-type]


def test_auto_is_counted_as_unquantized_and_never_below_what_it_holds(tiny: Path) -> None:
    card = card_for(tiny)
    model = load_model(tiny, ShardSpec(), torch.float32, torch.device("cpu"))
    summary = quantize_model(model, "auto")
    estimate = stage_weight_bytes(card, 0, card.num_layers, 1, "auto")
    assert estimate >= held_bytes(model, summary)
    assert layer_bytes(card, "auto") == card.layer_bytes


def test_quantized_matrices_are_smaller_than_float_ones_and_int4_falls_back_on_odd_widths() -> None:
    assert matmul_bytes(256, 512, 2, "none") == 256 * 512 * 2
    assert matmul_bytes(256, 512, 2, "int8") == 256 * 512 + 2 * 256
    assert matmul_bytes(256, 512, 2, "int4") == 256 * 512 + 8 * 256 * 16
    assert matmul_bytes(256, 500, 2, "int4") == matmul_bytes(256, 500, 2, "int8")  # 500 is no multiple of 32
    assert matmul_bytes(256, 512, 4, "int8") < matmul_bytes(256, 512, 2, "none")

"""Weight-only int8/int4: the formats, the kernels against their dequantized reference, and whole models
(tiny random ones and the embedded SmolLM2) staying close to their unquantized logits and greedy text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shoal.engine.batch import ScheduledChunk
from shoal.engine.embedded import embedded_model_path
from shoal.engine.layers import LinearBase, ParallelLMHead
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.model_runner import ModelRunner
from shoal.engine.quant import (
    Int4Kernel,
    Int8Kernel,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    quantize_model,
    relative_error,
)
from shoal.engine.quant.kernels import CPU_SMALL_M_INT4
from shoal.engine.sampling import SamplingParams
from shoal.engine.tokenizer import load_tokenizer
from tests.engine.tiny_models import write_tiny_model

CPU = torch.device("cpu")


def q4_1_like(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A weight as GGUF Q4_1 stores it: d * q + m per block of 32, q in 0..15, each block using 0 and 15."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // 32, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(n, k // 32, 1, generator=gen) * 0.01 + 0.001
    m = -8 * d + torch.randn(n, k // 32, 1, generator=gen) * 0.001
    return (d * q + m).reshape(n, k)


def test_int8_is_close_and_int4_reencodes_q4_1_without_loss() -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    assert relative_error(w, dequantize_int8(quantize_int8(w))) < 0.01
    assert 0.02 < relative_error(w, dequantize_int4(quantize_int4(w, 32))) < 0.15  # lossy on a Gaussian
    q41 = q4_1_like(64, 128)
    assert relative_error(q41, dequantize_int4(quantize_int4(q41, 32))) < 1e-5


def test_int4_refuses_a_group_size_that_does_not_divide_k() -> None:
    with pytest.raises(ValueError, match="group size 64 does not divide the 96"):
        quantize_int4(torch.randn(8, 96), 64)


@pytest.mark.parametrize("m", [1, 3, CPU_SMALL_M_INT4 + 5])  # fused kernel, and the dequantize + GEMM path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_their_dequantized_weight(m: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(96, 128, generator=gen)
    x = torch.randn(2, m, 128, generator=gen).to(dtype)  # any leading shape
    q8, q4 = quantize_int8(w), quantize_int4(w, 32)
    for kernel, ref_w in (
        (Int8Kernel(q8, CPU, torch.bfloat16), dequantize_int8(q8)),
        (Int4Kernel(q4, CPU), dequantize_int4(q4)),
    ):
        y = kernel(x)
        ref = x.float() @ ref_w.T
        assert y.dtype == dtype and y.shape == (2, m, 96)
        assert relative_error(ref, y) < 0.01, type(kernel).__name__


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = {}
    for arch in ("smollm", "qwen2"):  # tied head; untied head with qkv bias
        paths[arch] = tmp_path_factory.mktemp(arch)
        write_tiny_model(paths[arch], arch, hidden_size=128, intermediate_size=256)
    return paths


def tiny_runner(path: Path) -> ModelRunner:
    return ModelRunner(path, dtype=torch.bfloat16, kv_cache_bytes=1 << 20, block_size=4)


def prefill_logits(runner: ModelRunner, token_ids: list[int]) -> torch.Tensor:
    table = tuple(range(-(-len(token_ids) // runner.block_size)))
    chunk = ScheduledChunk(0, tuple(token_ids), 0, table, True)
    return runner.execute([chunk])[0]


@pytest.mark.parametrize("arch", ["smollm", "qwen2"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_tiny_models_stay_close_to_unquantized(
    tiny_paths: dict[str, Path], arch: str, mode: str
) -> None:
    prompt = list(range(3, 40))
    reference = prefill_logits(tiny_runner(tiny_paths[arch]), prompt)
    runner = tiny_runner(tiny_paths[arch])
    summary = quantize_model(runner.model, mode)
    linears = [m for m in runner.model.modules() if isinstance(m, LinearBase)]
    assert linears and all(m.weight is None for m in linears)
    assert set(summary.formats.values()) == {mode}
    assert summary.formats["lm_head"] == mode
    assert summary.weight_bytes_after < summary.weight_bytes_before
    logits = prefill_logits(runner, prompt)
    # random Gaussian weights are int4's worst case (~8% weight error); real checkpoints do far better
    assert F.cosine_similarity(reference, logits, dim=0) > (0.999 if mode == "int8" else 0.97)
    assert int(logits.argmax()) in reference.topk(1 if mode == "int8" else 3).indices.tolist()


def test_untied_head_weight_is_freed_and_tied_embedding_kept(tiny_paths: dict[str, Path]) -> None:
    untied, tied = tiny_runner(tiny_paths["qwen2"]), tiny_runner(tiny_paths["smollm"])
    embedding_before = tied.model.embed_tokens.weight.clone()
    quantize_model(untied.model, "int8")
    quantize_model(tied.model, "int8")
    assert untied.model.lm_head.weight.numel() == 0
    assert torch.equal(tied.model.embed_tokens.weight, embedding_before)
    assert tied.model.lm_head.weight is tied.model.embed_tokens.weight


def test_auto_picks_int4_only_where_it_is_lossless(tiny_paths: dict[str, Path]) -> None:
    runner = tiny_runner(tiny_paths["qwen2"])
    gate_up = runner.model.layers[0].mlp.gate_up_proj
    with torch.no_grad():  # this one weight as a 4-bit GGUF would give it
        gate_up.weight.copy_(q4_1_like(*gate_up.weight.shape))
    summary = quantize_model(runner.model, "auto")
    assert summary.formats["layers.0.mlp.gate_up_proj"] == "int4"
    assert summary.formats["layers.0.self_attn.qkv_proj"] == "int8"
    assert summary.formats["lm_head"] == "int4+int8"  # CPU: int4 speed, int8 logits where they matter


def test_unknown_mode_is_refused(tiny_paths: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'"):
        quantize_model(tiny_runner(tiny_paths["smollm"]).model, "int3")


def test_embedded_model_auto_keeps_logits_and_greedy_text(tmp_path_factory: pytest.TempPathFactory) -> None:
    runner = ModelRunner(embedded_model_path(), kv_cache_bytes=32 << 20, max_model_len=1024)
    prompt = list(range(200, 260))
    reference = prefill_logits(runner, prompt)
    quantize_model(runner.model, "auto")
    formats = {
        isinstance(m, ParallelLMHead): type(m._kernel).__name__
        for m in runner.model.modules()
        if isinstance(m, LinearBase | ParallelLMHead)
    }
    # Q4_1 linears re-encode; the Q8_0 head gets int8-refined int4
    assert formats == {False: "Int4Kernel", True: "RefinedHeadKernel"}
    logits = prefill_logits(runner, prompt)
    assert F.cosine_similarity(reference, logits, dim=0) > 0.999
    assert int(reference.argmax()) == int(logits.argmax())
    cache_dir = tmp_path_factory.getbasetemp() / "xdg-cache" / "shoal" / "tokenizers"
    engine = LLMEngine(runner, load_tokenizer(embedded_model_path(), cache_dir=cache_dir))
    question = [{"role": "user", "content": "What is the capital of France?"}]
    (answer,) = engine.generate([question], SamplingParams(temperature=0, max_tokens=12))
    assert "Paris" in answer.text


def test_quantizing_twice_is_refused(tiny_paths: dict[str, Path]) -> None:
    runner = tiny_runner(tiny_paths["smollm"])
    quantize_model(runner.model, "int8")
    with pytest.raises(ValueError, match="already has weight kernels"):
        quantize_model(runner.model, "int4")

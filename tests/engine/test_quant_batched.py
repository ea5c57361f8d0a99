"""The quantized paths of batched steps: the int8-refined LM head and the kept dense copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shoal.engine.batch import ScheduledChunk
from shoal.engine.embedded import embedded_model_path
from shoal.engine.layers import LinearBase, ParallelLMHead
from shoal.engine.llm_engine import Prompt, load_engine
from shoal.engine.model_runner import ModelRunner
from shoal.engine.quant import (
    Int4Kernel,
    Int8Kernel,
    RefinedHeadKernel,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    quantize_model,
    relative_error,
)
from shoal.engine.quant.head import CPU_SMALL_M_HEAD
from shoal.engine.quant.kernels import CPU_SMALL_M_DENSE, DenseKernel, packs_dense
from shoal.engine.sampling import SamplingParams
from tests.engine.tiny_models import write_tiny_model

CPU = torch.device("cpu")


def head_weight(n: int = 512, k: int = 128) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)


@pytest.mark.parametrize("m", [1, CPU_SMALL_M_HEAD + 3])  # int4 approximation, int8 GEMM approximation
def test_refined_head_gives_int8_logits_for_each_rows_best_candidates(m: int) -> None:
    weight = head_weight()
    kernel = RefinedHeadKernel(weight, group_size=32, refine_k=16)
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    logits = kernel(x)
    exact = x.float() @ dequantize_int8(quantize_int8(weight)).T  # int8 weight-only, fp32
    assert logits.shape == (m, 512) and logits.dtype == torch.float32
    best = exact.topk(16, dim=-1).indices
    for row in range(m):
        top = best[row, :8]  # the approximation keeps the true leaders among its 16 candidates
        torch.testing.assert_close(logits[row, top], exact[row, top], rtol=1e-5, atol=1e-4)
        assert int(logits[row].argmax()) == int(exact[row].argmax())
    # the rest stays a close approximation (int4 or int8-activation error)
    assert torch.nn.functional.cosine_similarity(logits, exact, dim=-1).min() > 0.99


def test_refined_head_row_does_not_depend_on_the_batch() -> None:
    weight = head_weight()
    kernel = RefinedHeadKernel(weight, group_size=32, refine_k=16)
    x = torch.randn(CPU_SMALL_M_HEAD + 5, 128, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    batched = kernel(x)  # the int8-GEMM approximation
    for row in range(x.shape[0]):
        alone = kernel(x[row : row + 1])[0]  # the int4 approximation
        top = alone.topk(8).indices
        torch.testing.assert_close(batched[row, top], alone[top], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [1, CPU_SMALL_M_DENSE + 1, 200])
def test_dense_copies_give_the_same_products_as_dequantizing_per_call(m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(96, 128, generator=gen)
    x = torch.randn(m, 128, generator=gen).to(torch.bfloat16)
    q4, q8 = quantize_int4(w, 32), quantize_int8(w)
    int4_dense, int4_plain = Int4Kernel(q4, CPU, dense=True), Int4Kernel(q4, CPU)
    int8_dense = Int8Kernel(q8, CPU, torch.bfloat16, dense=True)
    if m > 128:  # both past their crossover: the same GEMM on the same dequantized weight
        assert torch.equal(int4_dense(x), int4_plain(x))
    # below it, the dense GEMM is as close to the exact product as the fused kernel
    for kernel, ref_w in ((int4_dense, dequantize_int4(q4)), (int8_dense, dequantize_int8(q8))):
        assert relative_error(x.float() @ ref_w.T, kernel(x)) < 0.01
    assert int4_dense.dense_nbytes == 96 * 128 * 2 and int4_plain.dense_nbytes == 0


def test_dense_copies_follow_the_byte_budget(tmp_path: Path) -> None:
    write_tiny_model(tmp_path, "qwen2", hidden_size=128, intermediate_size=256)

    def quantized(budget: int) -> tuple[int, list[bool]]:
        runner = ModelRunner(tmp_path, dtype=torch.bfloat16, kv_cache_bytes=1 << 20, block_size=4)
        summary = quantize_model(runner.model, "int4", dense_copy_bytes=budget)
        kernels = [m._kernel for m in runner.model.modules() if isinstance(m, LinearBase)]
        return summary.dense_copy_bytes, [
            isinstance(k, Int4Kernel) and k.dense_weight is not None for k in kernels
        ]

    kept, flags = quantized(1 << 30)
    assert kept > 0 and all(flags)
    kept, flags = quantized(1024)  # too small for the copies of the whole model: none is kept
    assert kept == 0 and not any(flags)


def tokenizer_cache(factory: pytest.TempPathFactory) -> Path:
    return factory.getbasetemp() / "xdg-cache" / "shoal" / "tokenizers"


def test_load_engine_refuses_an_unknown_mode_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown quantization mode 'int2'"):
        load_engine(tmp_path / "missing", quant="int2")  # the mode is checked before the path


def test_load_engine_auto_decodes_the_same_in_a_batch_as_alone(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cache_dir = tmp_path_factory.getbasetemp() / "xdg-cache" / "shoal" / "tokenizers"
    engine = load_engine(
        embedded_model_path(),
        quant="auto",
        kv_cache_bytes=32 << 20,
        max_model_len=512,
        tokenizer_cache_dir=cache_dir,
    )
    assert engine.quantization is not None
    assert engine.quantization.formats["lm_head"] == "int4+int8"
    assert engine.quantization.dense_copy_bytes > 0
    prompts: list[Prompt] = [
        [{"role": "user", "content": q}]
        for q in ("What is the capital of France?", "Tell me a story about a dragon.")
    ]
    prompts += ["Once upon a time, in a small village by the sea,", "The history of the river valley begins"]
    prompts = prompts * 2  # 8 streams: past the dense-copy crossover in the layers and the head
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batched = engine.generate(prompts, params)
    assert "Paris" in batched[0].text
    for prompt, together in zip(prompts[:4], batched[:4], strict=True):
        (alone,) = engine.generate([prompt], params)
        assert together.token_ids == alone.token_ids


# inductor's own imports use the deprecated torch.jit.script_method
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_decode_runs_a_quantized_batch_like_eager(tmp_path: Path) -> None:
    """Batched decode of a quantized model goes through the dense copies, which compiled steps call inside
    their graph (one graph per layer call, so the steps are then called directly)."""
    write_tiny_model(tmp_path, "llama", hidden_size=128, intermediate_size=256)
    runners = []
    for _ in range(2):  # eager, then compiled
        runner = ModelRunner(tmp_path, dtype=torch.bfloat16, kv_cache_bytes=1 << 20, block_size=4)
        assert quantize_model(runner.model, "int4").dense_copy_bytes > 0
        runners.append(runner)
    runners[1].model.compile_decode()
    num_seqs, prefill, steps = CPU_SMALL_M_DENSE + 2, 4, 3
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (prefill + steps,), generator=gen).tolist() for _ in range(num_seqs)]
    tables = [(2 * s, 2 * s + 1) for s in range(num_seqs)]
    logits: list[list[torch.Tensor]] = [[], []]
    for runner, out in zip(runners, logits, strict=True):
        runner.execute(
            [ScheduledChunk(s, tuple(p[:prefill]), 0, tables[s], False) for s, p in enumerate(prompts)]
        )
        for pos in range(prefill, prefill + steps):
            out.append(
                runner.execute(
                    [ScheduledChunk(s, (p[pos],), pos, tables[s], True) for s, p in enumerate(prompts)]
                )
            )
    for eager, compiled in zip(*logits, strict=True):
        assert relative_error(eager, compiled) < 0.01
        # each row's greedy pick under the compiled step is as good as eager's under eager's logits (the
        # random tiny model has near ties that the fused kernels' rounding may break the other way)
        picked = eager.gather(1, compiled.argmax(-1, keepdim=True))[:, 0]
        assert torch.all(eager.max(-1).values - picked < 0.01)
    batched = runners[1].model.compiled_batched_decode
    assert batched is not None and batched.num_plans == 1, (
        "the batched steps did not run as one graph a layer"
    )


def test_none_mode_prepacks_bf16_weights_without_changing_the_logits(tmp_path: Path) -> None:
    write_tiny_model(tmp_path, "qwen2", hidden_size=128, intermediate_size=256)  # untied head, qkv bias

    def logits(mode: str | None) -> tuple[torch.Tensor, list[object]]:
        runner = ModelRunner(tmp_path, dtype=torch.bfloat16, kv_cache_bytes=1 << 20, block_size=4)
        if mode is not None:
            summary = quantize_model(runner.model, mode)
            assert set(summary.formats.values()) == {"none"}
            assert summary.weight_bytes_after == summary.weight_bytes_before
        kernels = [m._kernel for m in runner.model.modules() if isinstance(m, LinearBase | ParallelLMHead)]
        prompt = tuple(range(3, 20))
        out = runner.execute([ScheduledChunk(0, prompt, 0, tuple(range(5)), True)])[0]
        return out, kernels

    plain, plain_kernels = logits(None)
    packed, packed_kernels = logits("none")
    assert all(k is None for k in plain_kernels)
    if packs_dense(torch.ones(1, 1, dtype=torch.bfloat16)):  # a torch build with oneDNN
        assert all(isinstance(k, DenseKernel) for k in packed_kernels)
    assert torch.equal(plain, packed)

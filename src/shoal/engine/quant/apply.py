"""Choose and install weight kernels on a loaded model: `quantize_model(model, mode)`.

Inputs: a model whose linear layers are `LinearBase` and whose head is a `ParallelLMHead` (any shard of
it), already holding its float weights; a mode:
- "none": leave every product in the model dtype (on CPU in bf16, through `DenseKernel`'s prepacked
  weight: the same numbers as F.linear, ~2x faster at decode sizes);
- "int8": per-channel int8 everywhere;
- "int4": group-wise int4 everywhere (int8 where the device's int4 kernel does not take a shape);
- "auto": per weight, the smallest format that is accurate enough and has a fused decode kernel on this
  device: int4 when its relative weight error is <= 1% (near lossless: weights that came from a 4-bit
  GGUF), else int8 when its error is <= 2%, else the model dtype. So "auto" never costs more accuracy
  than int8. Fewest bytes is fastest here because a decode step is a matrix-vector product per weight,
  bound by the bytes it reads: on this 2-core AVX-512 CPU (1 thread, M=1) int8 and int4 take 0.4-0.6x
  the time of bf16 for every SmolLM2 shape, and tinygemm int4 on CUDA likewise beats a bf16 GEMV. The
  choice is by rule, not timed at load: timings on a shared machine flap between runs.
  On CPU an LM head that needs int8 gets the `RefinedHeadKernel` ("int4+int8": int4 speed, int8
  logits for each row's leading candidates).
Dense copies: on CPU the fused kernels' cost grows linearly with the rows of a step, so batched decode
and prefill run a dense GEMM instead; when the bf16 copies of all quantized weights fit
`dense_copy_bytes` (default 1 GiB: every model up to ~0.5B parameters), each kernel keeps its copy
rather than dequantizing per call (SmolLM2, 16 streams: layers ~60 -> ~25 ms a step).
Output: a `QuantizationSummary` (format per weight, weight bytes before and after, dense copy bytes).
Invariant: after it, a quantized `LinearBase` holds no float weight; a quantized untied head's float
weight is freed; a tied head's weight stays (the token embedding reads it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from shoal.engine.layers import LinearBase, ParallelLMHead
from shoal.engine.quant.formats import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    relative_error,
)
from shoal.engine.quant.head import RefinedHeadKernel
from shoal.engine.quant.kernels import (
    DenseKernel,
    Int4Kernel,
    Int8Kernel,
    has_fused_int8,
    int4_supported,
    packs_dense,
)

QuantMode = Literal["none", "int8", "int4", "auto"]
QUANT_MODES: tuple[str, ...] = ("none", "int8", "int4", "auto")
DEFAULT_INT4_GROUP_SIZE = 32  # GGUF Q4_0/Q4_1 block size: a 4-bit GGUF re-encodes without loss

INT8_MAX_REL_ERROR = 0.02
INT4_MAX_REL_ERROR = 0.01
DEFAULT_DENSE_COPY_BYTES = 1 << 30

Kernel = Int8Kernel | Int4Kernel | RefinedHeadKernel | DenseKernel
Format = Literal["int8", "int4", "int4+int8"]


@dataclass(frozen=True, slots=True)
class QuantizationSummary:
    mode: str
    formats: dict[str, str]  # module name -> "none" | "int8" | "int4"
    weight_bytes_before: int
    weight_bytes_after: int
    dense_copy_bytes: int = 0  # bf16 copies kept for batched steps (not in weight_bytes_after)

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for fmt in self.formats.values():
            counts[fmt] = counts.get(fmt, 0) + 1
        parts = ", ".join(f"{n} {fmt}" for fmt, n in sorted(counts.items()))
        dense = f" (+{self.dense_copy_bytes / 2**20:.1f} MiB dense copies)" if self.dense_copy_bytes else ""
        return (
            f"quantization {self.mode}: {parts}; matmul weights {self.weight_bytes_before / 2**20:.1f} MiB"
            f" -> {self.weight_bytes_after / 2**20:.1f} MiB{dense}"
        )


def quantize_model(
    model: nn.Module,
    mode: str,
    device: str | torch.device | None = None,
    group_size: int = DEFAULT_INT4_GROUP_SIZE,
    dense_copy_bytes: int = DEFAULT_DENSE_COPY_BYTES,
) -> QuantizationSummary:
    """Install weight kernels on every linear layer and the LM head of `model` (see the module docstring)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}: expected one of {', '.join(QUANT_MODES)}")
    installed = [
        name for name, module in model.named_modules() if getattr(module, "_kernel", None) is not None
    ]
    if installed:
        # its layers no longer hold plain weights to quantize: a second call would silently skip them
        raise ValueError(f"the model already has weight kernels (e.g. {installed[0]}): quantize it once")
    tied = _tied_heads(model)
    plan: list[tuple[str, LinearBase | ParallelLMHead, torch.Tensor, torch.device, Format | None]] = []
    for name, module, weight in _targets(model):
        dev = torch.device(device) if device is not None else weight.device
        fmt = None if mode == "none" else _choose(weight, mode, dev, group_size, module)
        plan.append((name, module, weight, dev, fmt))
    dense_bytes = sum(2 * w.numel() for _, _, w, dev, fmt in plan if fmt in ("int8", "int4"))
    keep_dense = dense_bytes <= dense_copy_bytes
    formats: dict[str, str] = {}
    before = after = kept = 0
    for name, module, weight, dev, fmt in plan:
        before += weight.nbytes
        formats[name] = fmt or "none"
        after += weight.nbytes if fmt is None else 0
        if fmt is None and not (dev == weight.device and packs_dense(weight)):
            continue
        kernel = (
            DenseKernel(weight)
            if fmt is None
            else _build(weight, fmt, dev, group_size, keep_dense and dev.type == "cpu")
        )
        after += kernel.nbytes if fmt is not None else 0
        kept += kernel.dense_nbytes
        module.set_weight_kernel(kernel)
        if isinstance(module, ParallelLMHead) and id(module) not in tied:
            module.weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
    return QuantizationSummary(mode, formats, before, after, kept)


def _targets(model: nn.Module) -> Iterator[tuple[str, LinearBase | ParallelLMHead, torch.Tensor]]:
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, LinearBase | ParallelLMHead) and weight is not None and weight.numel() > 0:
            yield name, module, weight.data


def _tied_heads(model: nn.Module) -> set[int]:
    """ids of the LM heads whose weight another module (the token embedding) also holds."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    return {id(h) for h in heads if owners.get(id(h.weight), 0) > 1}


def _choose(
    weight: torch.Tensor,
    mode: str,
    device: torch.device,
    group_size: int,
    module: nn.Module,
) -> Format | None:
    n, k = weight.shape
    int4_ok = int4_supported(n, k, group_size, device)
    if mode == "int8" or (mode == "int4" and not int4_ok):
        return "int8"
    if mode == "int4":
        return "int4"
    # accuracy gates on a sample of rows (the error is a per-row property; quantizing all of a 28M-entry
    # head twice just to measure it costs seconds), then only the chosen format is built in full
    sample = _sample_rows(weight)
    if (
        int4_ok
        and relative_error(sample, dequantize_int4(quantize_int4(sample, group_size))) <= INT4_MAX_REL_ERROR
    ):
        return "int4"
    compute_dtype = _compute_dtype(weight)
    if (
        has_fused_int8(device, compute_dtype)
        and relative_error(sample, dequantize_int8(quantize_int8(sample))) <= INT8_MAX_REL_ERROR
    ):
        refined = isinstance(module, ParallelLMHead) and device.type == "cpu" and int4_ok
        return "int4+int8" if refined else "int8"
    return None


def _build(weight: torch.Tensor, fmt: Format, device: torch.device, group_size: int, dense: bool) -> Kernel:
    if fmt == "int8":
        return Int8Kernel(quantize_int8(weight), device, _compute_dtype(weight), dense=dense)
    if fmt == "int4":
        return Int4Kernel(quantize_int4(weight, group_size), device, dense=dense)
    return RefinedHeadKernel(weight.to(device), group_size)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _sample_rows(weight: torch.Tensor, max_rows: int = 512) -> torch.Tensor:
    """Evenly spaced rows of `weight` (all of them when it has few)."""
    n = weight.shape[0]
    if n <= max_rows:
        return weight
    return weight[torch.linspace(0, n - 1, max_rows, device=weight.device).long()]

"""LM head kernel for CPU: cheap approximate logits, then each row's best candidates recomputed exactly.

The head is the largest single matrix of a small model (SmolLM2: 49152 x 576, a third of its weights),
and its weights often come from an 8-bit checkpoint, so int4 loses too much there (~9% weight error:
greedy text drifts within a few tokens) while the fused int8 kernel takes ~4.5 ms a token on this CPU.
`RefinedHeadKernel` gets int8 accuracy where it decides anything at about int4 cost:

1. approximate logits for every vocabulary row: the fused int4 kernel for M <= `small_m` rows (1.6 ms
   at M = 1), else one int8 x int8 -> int32 GEMM (`torch._int_mm`) on the int8 codes with each row's
   activations quantized to int8 with its own scale (16 rows: ~6 ms, where the fused int4 kernel takes
   ~14 ms and dequantize + GEMM ~40 ms);
2. each row's `refine_k` largest approximate logits are recomputed from the int8 weight in fp32 and
   written over the approximate ones.

So greedy decoding, top-k/top-p/min-p sampling and logprobs of the leading tokens see int8 weight-only
logits (more precise than `Int8Kernel`'s bf16 ones), and the result of a row does not depend on the other
rows of the step (per-row activation scales, exact integer accumulation, per-row refinement): a request
decodes the same in a batch as alone. Logits outside a row's top `refine_k` keep their approximate value
(int4 or int8-activation error, ~1% of a logit); they carry a negligible share of the probability mass.
"""

from __future__ import annotations

import torch

from shoal.engine.quant.formats import quantize_int4, quantize_int8
from shoal.engine.quant.kernels import Int4Kernel

DEFAULT_REFINE_K = 64
# The fused int4 kernel's cost grows linearly with M; the int8 GEMM's is nearly flat up to ~16 rows
# (49152 x 576, 1 thread: int4 fused 1.6 / 2.9 / 5.7 ms at M = 1 / 4 / 8, the int8 GEMM 3.6 / 5.4 / 6.2).
CPU_SMALL_M_HEAD = 4


class RefinedHeadKernel:
    """kernel(x) -> x @ W.T in fp32 (see the module docstring). CPU only."""

    format = "int4+int8"

    def __init__(self, weight: torch.Tensor, group_size: int, refine_k: int = DEFAULT_REFINE_K) -> None:
        if weight.device.type != "cpu":
            raise ValueError("RefinedHeadKernel runs on CPU only")
        self.out_features, self.in_features = weight.shape
        self.refine_k = min(refine_k, self.out_features)
        self.compute_dtype = torch.bfloat16
        self.small_m = CPU_SMALL_M_HEAD
        q8 = quantize_int8(weight)
        self.codes = q8.codes.contiguous()  # (N, K) int8
        self.scales = q8.scales.float()  # (N,)
        self.approx = Int4Kernel(quantize_int4(weight, group_size), weight.device)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.approx.nbytes

    @property
    def dense_nbytes(self) -> int:
        return 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        m = x2.shape[0]
        logits = self.approx(x2).float() if m <= self.small_m else self._int8_gemm(x2)  # (M, N)
        top = logits.topk(self.refine_k, dim=-1, sorted=False).indices  # (M, k)
        rows = self.codes.index_select(0, top.reshape(-1)).view(m, self.refine_k, self.in_features)
        exact = torch.bmm(rows.float(), x2[:, :, None])[..., 0] * self.scales[top]  # (M, k)
        logits.scatter_(1, top, exact)
        return logits.reshape(*x.shape[:-1], self.out_features)

    def _int8_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) fp32 -> (M, N) fp32 with int8 activations, one scale per row."""
        x_scales = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)  # (M, 1)
        x_codes = torch.round(x / x_scales).to(torch.int8)
        acc = torch._int_mm(x_codes, self.codes.t())  # (M, N) int32, exact
        return acc.float() * x_scales * self.scales

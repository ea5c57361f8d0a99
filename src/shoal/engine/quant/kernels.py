"""Weight kernels: callables `kernel(x) -> x @ W.T` that own a packed, quantized copy of W.

Each kernel has two paths, chosen per call by the number of rows M of x:
- M <= `small_m` (decode): torch's fused weight-only kernels, which read the packed weight once per row
  and are memory-bound, so fewer weight bytes is faster (CPU: `_weight_int8pack_mm`,
  `_weight_int4pack_mm_for_cpu`; CUDA: `_weight_int4pack_mm` (tinygemm, sm80+) and `_weight_int8pack_mm`
  where this torch build has it).
- larger M (prefill, big batches): those kernels' cost grows linearly with M, so past a crossover
  measured per format (int8: M > 8, int4: M > 128) W is dequantized to the compute dtype and one dense
  GEMM runs instead.

Activations: the fused CPU kernels are vectorized for bf16/fp16 only (fp32 input is 10-100x slower), and
tinygemm takes bf16 only, so a kernel computes in `compute_dtype` and casts x in (and y back) when the
model runs in another dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shoal.engine.quant.formats import Int4Weight, Int8Weight

# Largest M that still goes through the fused kernel: the measured crossover with dequantize + GEMM
# (1 thread, SmolLM2 shapes). The int4 unpack is costlier than int8's cast, so int4 stays fused longer:
# at M=16 the fused int4 kernel takes 240 us where unpack + GEMM takes 1350 us (960x576), at M=64 850 vs
# 1450; int8 at M=16 already 270 us fused vs 215 us cast + GEMM.
CPU_SMALL_M_INT8 = 8
CPU_SMALL_M_INT4 = 128
CUDA_SMALL_M = 32


class Int8Kernel:
    """Per-output-channel int8 weight: y = (x @ q.T) * s."""

    format = "int8"

    def __init__(self, q: Int8Weight, device: torch.device, compute_dtype: torch.dtype) -> None:
        self.out_features, self.in_features = q.codes.shape
        self.compute_dtype = compute_dtype
        self.codes = q.codes.to(device).contiguous()  # (N, K) int8
        self.scales = q.scales.to(device, compute_dtype)  # (N,)
        self.small_m = CUDA_SMALL_M if device.type == "cuda" else CPU_SMALL_M_INT8
        self.fused = has_fused_int8(device, compute_dtype)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if in_dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        x2 = x.reshape(-1, self.in_features).contiguous()  # the fused kernels read rows densely
        if self.fused and x2.shape[0] <= self.small_m:
            y = torch._weight_int8pack_mm(x2, self.codes, self.scales)
        else:  # exact: int8 codes fit bf16's mantissa, and the per-row scale commutes with the product
            y = F.linear(x2, self.codes.to(self.compute_dtype)) * self.scales
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if in_dtype == self.compute_dtype else y.to(in_dtype)


class Int4Kernel:
    """Group-wise asymmetric int4 weight: W = (q - 8) * s + z per group of K."""

    format = "int4"

    def __init__(self, q: Int4Weight, device: torch.device) -> None:
        n, k = q.codes.shape
        g = q.group_size
        self.out_features, self.in_features, self.group_size = n, k, g
        self.compute_dtype = torch.bfloat16
        self.device = device
        self.small_m = CUDA_SMALL_M if device.type == "cuda" else CPU_SMALL_M_INT4
        dt = self.compute_dtype
        # (K // g, N, 2): the layout torch's int4 kernels read their scales and zeros in
        self.scales_and_zeros = (
            torch.stack([q.scales, q.zeros], dim=-1).transpose(0, 1).contiguous().to(device, dt)
        )
        if device.type == "cuda":
            pairs = q.codes.to(torch.int32)
            packed_in = ((pairs[:, ::2] << 4) | pairs[:, 1::2]).to(torch.uint8).to(device)  # (N, K/2)
            self.packed = torch._convert_weight_to_int4pack(packed_in, _inner_k_tiles(k))
        else:
            self.packed = torch._convert_weight_to_int4pack_for_cpu(q.codes.to(torch.int32), 1)
        # For the dequantize path: the two halves of each group in one byte's low and high nibble, so
        # unpacking is two bit ops and one cat (no interleave).
        groups = q.codes.reshape(n, k // g, g)
        self.nibbles = (groups[..., : g // 2] | (groups[..., g // 2 :] << 4)).to(device)  # (N, G, g/2)
        self.group_scales = q.scales[..., None].to(device, dt)  # (N, G, 1)
        self.group_offsets = (q.zeros - 8 * q.scales)[..., None].to(device, dt)  # (N, G, 1)

    @property
    def nbytes(self) -> int:
        return (
            self.packed.nbytes
            + self.nibbles.nbytes
            + self.scales_and_zeros.nbytes
            + self.group_scales.nbytes
            + self.group_offsets.nbytes
        )

    def dequantize(self) -> torch.Tensor:
        codes = torch.cat([self.nibbles & 15, self.nibbles >> 4], dim=-1).to(self.compute_dtype)
        w = torch.addcmul(self.group_offsets, codes, self.group_scales)  # (N, G, g)
        return w.reshape(self.out_features, self.in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if in_dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        x2 = x.reshape(-1, self.in_features).contiguous()  # the fused kernels read rows densely
        if x2.shape[0] > self.small_m:
            y = F.linear(x2, self.dequantize())
        elif self.device.type == "cuda":
            y = torch._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if in_dtype == self.compute_dtype else y.to(in_dtype)


def int4_supported(out_features: int, in_features: int, group_size: int, device: torch.device) -> bool:
    """Whether this device's int4 kernel takes a weight of this shape and group size."""
    if group_size < 2 or group_size % 2 or in_features % group_size:
        return False
    if device.type == "cuda":
        # tinygemm: Ampere or newer, N a multiple of 8, K a multiple of 16 * innerKTiles (2 at least)
        major, _ = torch.cuda.get_device_capability(device)
        return (
            major >= 8
            and out_features % 8 == 0
            and in_features % 32 == 0
            and group_size in (32, 64, 128, 256)
        )
    return device.type == "cpu"


def _inner_k_tiles(in_features: int) -> int:
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


_FUSED_INT8: dict[tuple[str, torch.dtype], bool] = {}


def has_fused_int8(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `_weight_int8pack_mm` runs on this device type and dtype (probed once on a tiny input)."""
    key = (device.type, dtype)
    if key not in _FUSED_INT8:
        try:
            x = torch.ones(1, 32, dtype=dtype, device=device)
            w = torch.ones(8, 32, dtype=torch.int8, device=device)
            s = torch.ones(8, dtype=dtype, device=device)
            y = torch._weight_int8pack_mm(x, w, s)
            _FUSED_INT8[key] = bool(torch.all(y == 32).item())
        except (RuntimeError, NotImplementedError):  # no kernel registered for this backend or dtype
            _FUSED_INT8[key] = False
    return _FUSED_INT8[key]

"""Weight-only quantization math: float weights in, integer codes and scales out (and back). No kernels here.

int8: symmetric, one scale per output channel: W ≈ q * s[:, None], q in [-127, 127].
int4: asymmetric, one (scale, zero) per group of `group_size` input features along K:
      W ≈ (q - 8) * s + z with q in [0, 15] — the form torch's int4 kernels take (`scales_and_zeros`).
      It is also GGUF Q4_1's form (d * q + m with m = z - 8 s), so a Q4_1 checkpoint re-encodes without loss
      at group size 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Int8Weight:
    codes: torch.Tensor  # (N, K) int8
    scales: torch.Tensor  # (N,) fp32


@dataclass(frozen=True, slots=True)
class Int4Weight:
    codes: torch.Tensor  # (N, K) uint8, values 0..15
    scales: torch.Tensor  # (N, K // group_size) fp32
    zeros: torch.Tensor  # (N, K // group_size) fp32
    group_size: int


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(codes, scales)


def dequantize_int8(q: Int8Weight) -> torch.Tensor:
    return q.codes.float() * q.scales[:, None]


def quantize_int4(weight: torch.Tensor, group_size: int) -> Int4Weight:
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the {k} input features")
    w = weight.float().reshape(n, k // group_size, group_size)
    low = w.amin(dim=-1)
    high = w.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-12)  # (N, G)
    codes = torch.round((w - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    zeros = low + 8 * scales
    return Int4Weight(codes.reshape(n, k), scales, zeros, group_size)


def dequantize_int4(q: Int4Weight) -> torch.Tensor:
    n, k = q.codes.shape
    g = q.group_size
    codes = q.codes.reshape(n, k // g, g).float()
    return ((codes - 8) * q.scales[..., None] + q.zeros[..., None]).reshape(n, k)


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||W - W'||_F / ||W||_F (0 for an all-zero W reproduced exactly)."""
    w = weight.float()
    norm = float(w.norm())
    diff = float((w - approx.float()).norm())
    return diff / norm if norm > 0 else diff

"""Rotary position embedding (Hugging Face's half-split layout), with Llama 3 and linear scaling.

`RotaryEmbedding.cos_sin(positions)` is looked up once per step and shared by every layer;
`apply_rotary(x, cos, sin)` rotates q or k of shape (T, heads, head_dim).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shoal.engine.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "freq_factors":
        if len(scaling.factors) != inv_freq.numel():
            raise ValueError(
                f"{len(scaling.factors)} rope frequency factors for {inv_freq.numel()} frequencies"
            )
        return inv_freq / torch.tensor(scaling.factors, dtype=torch.float32)
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    cos: torch.Tensor  # (max_positions, head_dim): [cos, cos]
    sin: torch.Tensor  # (max_positions, head_dim): [-sin, sin], rotate_half's sign folded in

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None, dtype: torch.dtype
    ) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # (P, head_dim/2)
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1).to(dtype), persistent=False)
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1).to(dtype), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 1, head_dim) cos and sign-folded sin for `apply_rotary`, broadcasting over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, head_dim) -> x * cos + rotate_half(x) * sin, with rotate_half's sign folded into `sin`.

    Rolling the last dim by head_dim/2 turns [x1, x2] into [x2, x1]; times [-sin, sin] that is
    [-x2 sin, x1 sin], HF's rotate_half(x) * sin, in three kernels instead of seven.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)

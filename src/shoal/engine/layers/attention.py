"""Paged attention over a block KV cache.

Cache layout per layer: k and v of shape (num_blocks, block_size, num_kv_heads, head_dim), viewed flat as
(num_slots, num_kv_heads, head_dim). `AttentionMetadata` is built once per step by the model runner and
shared by every layer: where each new token's k/v go (`slot_mapping`), and how the step's queries split
into attention groups:

- a prefill chunk with nothing cached before it attends causally to its own fresh k/v (no gather);
- a chunk that starts mid-sequence gathers its whole context [0, end_pos) from the cache and masks
  causally with the offset;
- all single-token (decode) queries of the step form one batch: their contexts are gathered padded to
  the longest, one SDPA call with a length mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True)
class AttentionGroup:
    rows: slice | torch.Tensor  # the step's query rows this group covers
    gather: torch.Tensor | None  # (B, L) cache slots of each query's context; None: use fresh k/v
    mask: torch.Tensor | None  # (B, 1, Tq, L) bool, True = attend; None: no masking needed
    causal: bool  # fresh-k/v prefill: causal mask from the top-left
    batch: int  # B; Tq = rows // B


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) int64 cache slot of each new token
    groups: tuple[AttentionGroup, ...]


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads  # local
        self.num_kv_heads = num_kv_heads  # local
        self.head_dim = head_dim

    def forward(
        self,
        q: torch.Tensor,  # (T, H, D)
        k: torch.Tensor,  # (T, Hkv, D)
        v: torch.Tensor,  # (T, Hkv, D)
        k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, H * D)
        k_flat = k_cache.view(-1, self.num_kv_heads, self.head_dim)  # (num_slots, Hkv, D)
        v_flat = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        k_flat.index_copy_(0, meta.slot_mapping, k)
        v_flat.index_copy_(0, meta.slot_mapping, v)
        if len(meta.groups) == 1:
            return self._group(meta.groups[0], q, k, v, k_flat, v_flat).reshape(q.shape[0], -1)
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        for group in meta.groups:
            out[group.rows] = self._group(group, q, k, v, k_flat, v_flat).reshape(-1, out.shape[1])
        return out

    def _group(
        self,
        group: AttentionGroup,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_flat: torch.Tensor,
        v_flat: torch.Tensor,
    ) -> torch.Tensor:  # (B, Tq, H, D)
        b = group.batch
        q_g = q[group.rows].view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, D)
        if group.gather is None:
            k_g = k[group.rows].view(b, -1, self.num_kv_heads, self.head_dim)  # (B, Tq, Hkv, D)
            v_g = v[group.rows].view(b, -1, self.num_kv_heads, self.head_dim)
        else:
            k_g = k_flat[group.gather]  # (B, L, Hkv, D)
            v_g = v_flat[group.gather]
        out = F.scaled_dot_product_attention(
            q_g,
            k_g.transpose(1, 2),  # (B, Hkv, L, D)
            v_g.transpose(1, 2),
            attn_mask=group.mask,
            is_causal=group.causal,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # (B, H, Tq, D)
        return out.transpose(1, 2)  # (B, Tq, H, D)

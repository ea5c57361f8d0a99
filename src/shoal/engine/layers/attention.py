"""Paged attention over a block KV cache.

Cache layout per layer: k and v of shape (num_blocks, block_size, num_kv_heads, head_dim), viewed flat as
(num_slots, num_kv_heads, head_dim). `AttentionMetadata` is built once per step by the model runner and
shared by every layer: where each new token's k/v go (`slot_mapping`), and how the step's queries split
into attention groups:

- a prefill chunk with nothing cached before it attends causally to its own fresh k/v (no gather);
- a chunk that starts mid-sequence gathers its whole context [0, end_pos) from the cache and masks
  causally with the offset;
- all single-token (decode) queries of the step form one batch: their contexts are gathered padded to
  the longest and attended with two batched matmuls and an additive length mask. On CPU that is ~4x
  faster than SDPA's flash kernel for one query per sequence (and matches HF's eager attention:
  scores in the model dtype, softmax in fp32).
Gathers use `index_select` on the flat cache: several times faster than advanced indexing on CPU.
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
    mask: torch.Tensor | None  # (B, 1, Tq, L) bool, True = attend; decode: additive (B, 1, 1, L); None: all
    causal: bool  # fresh-k/v prefill: causal mask from the top-left
    batch: int  # B; Tq = rows // B
    decode: bool = False  # one query per sequence (Tq = 1): the matmul path


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
        self.group_size = num_heads // num_kv_heads  # query heads per kv head
        self.scale = head_dim**-0.5

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
        if group.decode:
            return self._decode(group, q, k_flat, v_flat)
        q_g = q[group.rows].view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, D)
        if group.gather is None:
            k_g = k[group.rows].view(b, -1, self.num_kv_heads, self.head_dim)  # (B, Tq, Hkv, D)
            v_g = v[group.rows].view(b, -1, self.num_kv_heads, self.head_dim)
        else:
            k_g = self._gather(k_flat, group.gather)  # (B, L, Hkv, D)
            v_g = self._gather(v_flat, group.gather)
        out = F.scaled_dot_product_attention(
            q_g,
            k_g.transpose(1, 2),  # (B, Hkv, L, D)
            v_g.transpose(1, 2),
            attn_mask=group.mask,
            is_causal=group.causal,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # (B, H, Tq, D)
        return out.transpose(1, 2)  # (B, Tq, H, D)

    def _gather(self, flat: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(num_slots, Hkv, D) cache, (B, L) slots -> (B, L, Hkv, D)."""
        return flat.index_select(0, slots.view(-1)).view(*slots.shape, self.num_kv_heads, self.head_dim)

    def _decode(
        self, group: AttentionGroup, q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor
    ) -> torch.Tensor:  # (B, 1, H, D)
        assert group.gather is not None
        b = group.batch
        # query head h reads kv head h // group_size, as in HF's repeat_kv
        q_g = q[group.rows].view(b, self.num_kv_heads, self.group_size, self.head_dim) * self.scale
        # a contiguous (B, Hkv, L, D) copy makes the batched matmul ~3x faster than a strided view
        k_g = self._gather(k_flat, group.gather).transpose(1, 2).contiguous()  # (B, Hkv, L, D)
        v_g = self._gather(v_flat, group.gather).transpose(1, 2)  # (B, Hkv, L, D)
        scores = torch.matmul(q_g, k_g.transpose(-1, -2))  # (B, Hkv, G, L)
        if group.mask is not None:
            scores = scores + group.mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v_g).view(
            b, 1, self.num_heads, self.head_dim
        )  # (B, Hkv, G, D) = (B, 1, H, D)

"""Paged attention over a block KV cache.

Cache layout per layer: one tensor (num_blocks, block_size, 2, num_kv_heads, head_dim), k at [..., 0, :, :]
and v at [..., 1, :, :], viewed flat as (num_slots, 2, num_kv_heads, head_dim). k and v of a token sit side
by side because the fused qkv projection already lays them out that way: one `index_copy_` writes both
and one `index_select` gathers both (half the per-layer kernels of separate k and v caches).
`AttentionMetadata` is built once per step by the model runner and shared by every layer: where each new
token's k/v go (`slot_mapping`), and how the step's queries split into attention groups:

- a prefill chunk with nothing cached before it attends causally to its own fresh k/v (no gather);
- a chunk that starts mid-sequence gathers its whole context [0, end_pos) from the cache and masks
  causally with the offset;
- all single-token (decode) queries of the step form one batch: their contexts are gathered padded to
  the longest and attended with two batched matmuls (the first with the scale and an additive length mask
  folded in: `baddbmm`). On CPU that is ~4x faster than SDPA's flash kernel for one query per sequence.
  The decode matmuls run in `attention_compute_dtype`: fp32 on CPU, where a bf16 batched matmul of these
  shapes is ~4x slower than an fp32 one (44 vs 12 us for 9 heads x 40 keys) and the casts ride on copies
  that are needed anyway; the model dtype elsewhere. fp32 scores are more precise than HF's bf16 eager ones.
Gathers use `index_select` on the flat cache: several times faster than advanced indexing on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def attention_compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype decode attention computes in (see the module docstring)."""
    return torch.float32 if device.type == "cpu" else dtype


@dataclass(frozen=True, slots=True)
class AttentionGroup:
    rows: slice | torch.Tensor  # the step's query rows this group covers
    gather: torch.Tensor | None  # (B, L) cache slots of each query's context; None: use fresh k/v
    # prefill: (B, 1, Tq, L) bool, True = attend, or None: all; decode: additive (B * Hkv, 1, L) in the
    # attention compute dtype, 0 or -inf (padding), always present
    mask: torch.Tensor | None
    causal: bool  # fresh-k/v prefill: causal mask from the top-left
    batch: int  # B; Tq = rows // B
    decode: bool = False  # one query per sequence (Tq = 1): the matmul path


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) int64 cache slot of each new token
    groups: tuple[AttentionGroup, ...]
    decode_only: bool = False  # every query is a sequence's one new token (one decode group)


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
        kv: torch.Tensor,  # (T, 2, Hkv, D): k and v of the new tokens
        kv_cache: torch.Tensor,  # (num_blocks, block_size, 2, Hkv, D)
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, H * D)
        kv_flat = kv_cache.view(-1, 2, self.num_kv_heads, self.head_dim)  # (num_slots, 2, Hkv, D)
        kv_flat.index_copy_(0, meta.slot_mapping, kv)
        if len(meta.groups) == 1:
            return self._group(meta.groups[0], q, kv, kv_flat).reshape(q.shape[0], -1)
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        for group in meta.groups:
            out[group.rows] = self._group(group, q, kv, kv_flat).reshape(-1, out.shape[1])
        return out

    def _group(
        self, group: AttentionGroup, q: torch.Tensor, kv: torch.Tensor, kv_flat: torch.Tensor
    ) -> torch.Tensor:  # (B, Tq, H, D)
        b = group.batch
        if group.decode:
            return self._decode(group, q, kv_flat)
        q_g = q[group.rows].view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, D)
        if group.gather is None:
            kv_g = kv[group.rows].view(b, -1, 2, self.num_kv_heads, self.head_dim)  # (B, Tq, 2, Hkv, D)
        else:
            kv_g = self._gather(kv_flat, group.gather)  # (B, L, 2, Hkv, D)
        out = F.scaled_dot_product_attention(
            q_g,
            kv_g[:, :, 0].transpose(1, 2),  # (B, Hkv, L, D)
            kv_g[:, :, 1].transpose(1, 2),
            attn_mask=group.mask,
            is_causal=group.causal,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # (B, H, Tq, D)
        return out.transpose(1, 2)  # (B, Tq, H, D)

    def _gather(self, flat: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(num_slots, 2, Hkv, D) cache, (B, L) slots -> (B, L, 2, Hkv, D)."""
        return flat.index_select(0, slots.view(-1)).view(*slots.shape, 2, self.num_kv_heads, self.head_dim)

    def _decode(self, group: AttentionGroup, q: torch.Tensor, kv_flat: torch.Tensor) -> torch.Tensor:
        assert group.gather is not None and group.mask is not None
        b, hkv, d = group.batch, self.num_kv_heads, self.head_dim
        compute = group.mask.dtype
        length = group.gather.shape[1]
        # query head h reads kv head h // group_size, as in HF's repeat_kv
        q_g = q[group.rows].to(compute).reshape(b * hkv, self.group_size, d)  # (B * Hkv, G, D)
        # one copy turns the gathered (B, L, 2, Hkv, D) into dense (2, B, Hkv, L, D) in the compute dtype:
        # dense operands make the batched matmuls ~3x faster than strided views
        kv_g = self._gather(kv_flat, group.gather).permute(2, 0, 3, 1, 4)
        kv_g = kv_g.to(compute, memory_format=torch.contiguous_format, copy=True)
        k_g = kv_g[0].view(b * hkv, length, d)  # (B * Hkv, L, D)
        v_g = kv_g[1].view(b * hkv, length, d)
        scores = torch.baddbmm(group.mask, q_g, k_g.transpose(1, 2), alpha=self.scale)  # (B * Hkv, G, L)
        # softmax in fp32 (as HF); asking for the dtype it already has still costs a cast on CPU
        probs = (
            torch.softmax(scores, dim=-1)
            if compute == torch.float32
            else torch.softmax(scores, dim=-1, dtype=torch.float32).to(compute)
        )
        out = torch.bmm(probs, v_g)  # (B * Hkv, G, D)
        return out.to(q.dtype).view(b, 1, self.num_heads, d)  # (B, 1, H, D)

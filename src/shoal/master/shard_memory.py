"""How much memory one shard needs: its weights, its KV cache, and the runner's own overhead. Pure.

Rules (placement relies on them; the runner sizes its KV cache from the same numbers):
- weights: the shard's layers, plus the embedding on the first pipeline stage and the final norm and LM
  head on the last; tied embeddings are held once when one stage is both first and last. Tensor
  parallelism divides every matrix by the group size (rounded up: the vocabulary may not divide).
- KV cache: `tokens` tokens of keys and values for each layer the shard holds, its share of the KV heads.
- overhead: a fixed `RUNNER_OVERHEAD_BYTES` per runner for the interpreter, torch and activations.
"""

from __future__ import annotations

from shoal.types.instances import ModelCard

RUNNER_OVERHEAD_BYTES = 256 * 2**20
"""Resident memory of a runner process beyond weights and KV cache (Python, torch, activations)."""

DEFAULT_KV_HEADROOM_TOKENS = 4096
"""KV-cache tokens reserved when a request does not say (capped at the model's context length)."""


def headroom_tokens(card: ModelCard, requested: int | None) -> int:
    return min(card.context_length, DEFAULT_KV_HEADROOM_TOKENS) if requested is None else requested


def _share(total: int, tp_size: int) -> int:
    return -(-total // tp_size)


def fixed_weight_bytes(card: ModelCard, first: bool, last: bool, tp_size: int = 1) -> int:
    """Weights a shard holds besides its decoder layers: the embedding if first, norm and head if last."""
    total = 0
    if first:
        total += _share(card.embedding_bytes, tp_size)
    if last:
        total += _share(card.head_bytes, tp_size)
    if first and last and card.tie_word_embeddings:
        total -= _share(card.embedding_bytes, tp_size)
    return total


def stage_weight_bytes(card: ModelCard, layer_start: int, layer_end: int, tp_size: int = 1) -> int:
    """Weights held by the shard that has layers [layer_start, layer_end) and 1/tp_size of each matrix."""
    layers = _share((layer_end - layer_start) * card.layer_bytes, tp_size)
    return layers + fixed_weight_bytes(card, layer_start == 0, layer_end == card.num_layers, tp_size)


def stage_kv_bytes(card: ModelCard, num_layers: int, tokens: int, tp_size: int = 1) -> int:
    """KV cache for `tokens` tokens over `num_layers` layers, with 1/tp_size of the KV heads."""
    kv_heads = _share(card.num_kv_heads, tp_size)
    return tokens * num_layers * 2 * kv_heads * card.head_dim * card.dtype_bytes


def format_bytes(num_bytes: int) -> str:
    """Decimal units, as people read memory sizes in messages: 3.2 GB, 512.0 MB, 900 kB."""
    for unit, size in (("GB", 10**9), ("MB", 10**6)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.1f} {unit}"
    if abs(num_bytes) >= 10**3:
        return f"{num_bytes / 10**3:.0f} kB"
    return f"{num_bytes} B"

"""How much memory one shard needs: its weights, its KV cache, and the runner's own overhead. Pure.

Rules (placement relies on them; the runner sizes its KV cache from the same numbers):
- weights: the shard's layers, plus the embedding on the first pipeline stage and the final norm and LM
  head on the last; tied embeddings are held once when one stage is both first and last. Tensor
  parallelism divides every matrix by the group size (rounded up: the vocabulary may not divide).
- KV cache: `tokens` tokens of keys and values for each layer the shard holds, its share of the KV heads.
- overhead: a fixed `RUNNER_OVERHEAD_BYTES` per runner for the interpreter, torch and activations.
- quantization: the matmul weights (q/k/v/o, gate/up/down, LM head) take what the runner's kernels hold
  (`shoal.engine.quant`): int8 N*K codes + N scales; int4 N*K bytes (its two packings of 4-bit codes) +
  8 bytes per group of 32 (scales and zeros in three layouts), int8 where K does not divide into groups.
  "auto" may keep any weight in the model dtype, so it counts as unquantized (conservative). Norms,
  biases and the token embedding stay in the model dtype; a head tied to the embedding on the same stage
  keeps its float weight as well as its quantized one.
"""

from __future__ import annotations

from shoal.types.instances import ModelCard, WeightQuant

RUNNER_OVERHEAD_BYTES = 256 * 2**20
"""Resident memory of a runner process beyond weights and KV cache (Python, torch, activations)."""

DEFAULT_KV_HEADROOM_TOKENS = 4096
"""KV-cache tokens reserved when a request does not say (capped at the model's context length)."""


def headroom_tokens(card: ModelCard, requested: int | None) -> int:
    return min(card.context_length, DEFAULT_KV_HEADROOM_TOKENS) if requested is None else requested


def _share(total: int, tp_size: int) -> int:
    return -(-total // tp_size)


INT4_GROUP_SIZE = 32
"""The runner's int4 group size (shoal.engine.quant's default)."""


def matmul_bytes(out_features: int, in_features: int, element_bytes: int, quant: WeightQuant) -> int:
    """Bytes of one (out, in) weight matrix as the runner holds it under `quant`."""
    if quant == "int4" and in_features % INT4_GROUP_SIZE == 0:
        return out_features * in_features + 8 * out_features * (in_features // INT4_GROUP_SIZE)
    if quant in ("int8", "int4"):
        return out_features * in_features + 2 * out_features
    return out_features * in_features * element_bytes


def layer_bytes(card: ModelCard, quant: WeightQuant = "none") -> int:
    """One decoder layer's weights: its matmul weights under `quant`, the rest (norms, biases) as is."""
    if quant in ("none", "auto"):
        return card.layer_bytes
    hidden, q_size, kv_size = (
        card.hidden_size,
        card.num_heads * card.head_dim,
        card.num_kv_heads * card.head_dim,
    )
    shapes = [(q_size, hidden), (kv_size, hidden), (kv_size, hidden), (hidden, q_size)]
    shapes += [(card.intermediate_size, hidden)] * 2 + [(hidden, card.intermediate_size)]
    dense = sum(n * k for n, k in shapes) * card.dtype_bytes
    rest = max(0, card.layer_bytes - dense)
    return rest + sum(matmul_bytes(n, k, card.dtype_bytes, quant) for n, k in shapes)


def head_bytes(card: ModelCard, quant: WeightQuant = "none") -> int:
    """The final norm and LM head under `quant` (the head matrix quantized, the norm as is)."""
    if quant in ("none", "auto"):
        return card.head_bytes
    dense = card.vocab_size * card.hidden_size * card.dtype_bytes
    rest = max(0, card.head_bytes - dense)
    return rest + matmul_bytes(card.vocab_size, card.hidden_size, card.dtype_bytes, quant)


def fixed_weight_bytes(
    card: ModelCard, first: bool, last: bool, tp_size: int = 1, quant: WeightQuant = "none"
) -> int:
    """Weights a shard holds besides its decoder layers: the embedding if first, norm and head if last."""
    total = 0
    if first:
        total += _share(card.embedding_bytes, tp_size)
    if last:
        total += _share(head_bytes(card, quant), tp_size)
    if first and last and card.tie_word_embeddings and quant == "none":
        # One tensor serves both. A quantized tied head holds its kernel next to the embedding's floats
        # ("auto" may quantize it: counting the head twice in the model dtype bounds float + kernel).
        total -= _share(card.embedding_bytes, tp_size)
    return total


def stage_weight_bytes(
    card: ModelCard, layer_start: int, layer_end: int, tp_size: int = 1, quant: WeightQuant = "none"
) -> int:
    """Weights held by the shard that has layers [layer_start, layer_end) and 1/tp_size of each matrix."""
    layers = _share((layer_end - layer_start) * layer_bytes(card, quant), tp_size)
    return layers + fixed_weight_bytes(card, layer_start == 0, layer_end == card.num_layers, tp_size, quant)


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

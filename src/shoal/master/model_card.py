"""Build a `ModelCard` (what placement needs to know about a model) from the engine's `ModelConfig`.

Byte counts come from the model's shape at the dtype the runners will load it in. When the caller knows
the real total (e.g. the size of a safetensors checkpoint stored at that dtype), the per-part counts are
scaled to add up to it, keeping their proportions.
"""

from __future__ import annotations

from shoal.engine.config import ModelConfig
from shoal.types.instances import DTYPE_BYTES, ModelCard


def model_card_from_config(
    config: ModelConfig,
    *,
    model_id: str,
    source: str,
    dtype: str | None = None,
    weight_bytes: int | None = None,
) -> ModelCard:
    """`dtype`: the dtype runners load the weights in (default: the checkpoint's own).
    `weight_bytes`: the model's known total weight size at that dtype, if any."""
    dtype = dtype or config.dtype
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPE_BYTES)}")
    element = DTYPE_BYTES[dtype]
    layer, embedding, head = _param_counts(config)
    layer_bytes, embedding_bytes, head_bytes = layer * element, embedding * element, head * element
    if weight_bytes is not None:
        if weight_bytes <= 0:
            raise ValueError(f"weight_bytes must be positive, got {weight_bytes}")
        shared = embedding_bytes if config.tie_word_embeddings else 0
        computed = embedding_bytes + config.num_layers * layer_bytes + head_bytes - shared
        scale = weight_bytes / computed
        layer_bytes = round(layer_bytes * scale)
        embedding_bytes = round(embedding_bytes * scale)
        head_bytes = round(head_bytes * scale)
    return ModelCard.model_validate(
        {
            "model_id": model_id,
            "source": source,
            "architecture": config.architecture,
            "dtype": dtype,
            "num_layers": config.num_layers,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_heads": config.num_heads,
            "num_kv_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "vocab_size": config.vocab_size,
            "context_length": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings,
            "layer_bytes": layer_bytes,
            "embedding_bytes": embedding_bytes,
            "head_bytes": head_bytes,
        }
    )


def _param_counts(config: ModelConfig) -> tuple[int, int, int]:
    """Parameters of (one decoder layer, the embedding, the final norm + LM head) of a Llama-family model."""
    hidden = config.hidden_size
    q_size = config.num_heads * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    attention = hidden * q_size + 2 * hidden * kv_size + q_size * hidden
    if config.attention_bias:
        attention += q_size + 2 * kv_size
    if config.qk_norm:
        attention += 2 * config.head_dim
    mlp = 3 * hidden * config.intermediate_size
    norms = 2 * hidden
    embedding = config.vocab_size * hidden
    head = config.vocab_size * hidden + hidden
    return attention + mlp + norms, embedding, head

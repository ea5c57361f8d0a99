"""Tensor-parallel building blocks shared by the model files."""

from shoal.engine.layers.attention import (
    AttentionGroup,
    AttentionMetadata,
    PagedAttention,
    attention_compute_dtype,
)
from shoal.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shoal.engine.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    WeightKernel,
)
from shoal.engine.layers.norm import RMSNorm
from shoal.engine.layers.rotary import RotaryEmbedding, apply_rotary

__all__ = [
    "AttentionGroup",
    "AttentionMetadata",
    "ColumnParallelLinear",
    "LinearBase",
    "MergedColumnParallelLinear",
    "PagedAttention",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "ReplicatedLinear",
    "RotaryEmbedding",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "WeightKernel",
    "apply_rotary",
    "attention_compute_dtype",
]

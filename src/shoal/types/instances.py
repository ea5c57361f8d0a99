"""Instances: a model card, the request to place it, and the placed result (shards on nodes).

A `ModelCard` is what placement knows about a model: its shape and the bytes it takes in memory at the
dtype the runners load it in. An `Instance` is one placement: which node holds which shard (layer range
and tensor-parallel rank), on which device, and where the shards meet to start their `torch.distributed`
group. Its validator enforces the shape invariants every consumer relies on (ranks 0..n-1 in order, one
shard per node, layer ranges that tile the model for pipeline, full ranges for tensor).
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, StringConstraints, model_validator

from shoal.types._base import FrozenModel
from shoal.types.ids import NodeId, NodeIdField
from shoal.types.instance_ids import InstanceIdField, RunnerId, RunnerIdField

Sharding = Literal["pipeline", "tensor"]
"""How an instance is split: ranges of layers per node, or heads and MLP columns inside every layer."""
ShardingChoice = Literal["pipeline", "tensor", "auto"]
CommBackend = Literal["gloo", "nccl"]
"""The `torch.distributed` backend the runners of one instance use between themselves."""
CommBackendChoice = Literal["auto", "gloo", "nccl"]
ModelDtype = Literal["float32", "bfloat16", "float16"]
WeightQuant = Literal["none", "int8", "int4", "auto"]
"""Weight-only quantization the runners apply after loading (`shoal.engine.quant.quantize_model`'s modes):
int8 per channel, int4 group-wise, or "auto" (per weight the smallest format that stays accurate)."""
DEFAULT_WEIGHT_QUANT: WeightQuant = "auto"
"""What a placement request gets when it does not say: the same default as `shoal generate --quant`."""

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

Bytes = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Device = Annotated[str, StringConstraints(pattern=r"^(cpu|mps|cuda:[0-9]{1,3})$")]
Host = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class ModelCard(FrozenModel):
    """A model as placement sees it. Byte counts are at `dtype`, the dtype the runners load weights in
    (a GGUF file is dequantized on load, so its in-memory size is not its file size).

    `head_bytes` is the final norm plus the LM head matrix, counted even with tied embeddings: a last
    pipeline stage that is not also the first holds its own copy of the embedding matrix as its head.
    """

    model_id: ModelName
    source: ModelName
    architecture: ModelName
    dtype: ModelDtype
    num_layers: Positive
    hidden_size: Positive
    intermediate_size: Positive
    num_heads: Positive
    num_kv_heads: Positive
    head_dim: Positive
    vocab_size: Positive
    context_length: Positive
    tie_word_embeddings: bool
    layer_bytes: Bytes
    embedding_bytes: Bytes
    head_bytes: Bytes

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def weight_bytes(self) -> int:
        """All weights held by a single process (tied embeddings counted once)."""
        shared = self.embedding_bytes if self.tie_word_embeddings else 0
        return self.embedding_bytes + self.num_layers * self.layer_bytes + self.head_bytes - shared

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """Keys and values of one token in one layer, all heads."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token in every layer: what one more token of context costs."""
        return self.num_layers * self.kv_bytes_per_token_per_layer


class PlacementRequest(FrozenModel):
    """What a person asks for. `node_ids`, when given, is the exact set of nodes to use (placement still
    orders their ranks). `kv_headroom_tokens`: tokens of KV cache to reserve memory for (None: the
    placement default, see `shoal.master.shard_memory`). `quant`: the weight quantization the runners
    apply after loading."""

    model_id: ModelName
    sharding: ShardingChoice = "auto"
    min_nodes: Positive = 1
    backend: CommBackendChoice = "auto"
    node_ids: tuple[NodeIdField, ...] | None = None
    kv_headroom_tokens: Annotated[int, Field(ge=0)] | None = None
    quant: WeightQuant = DEFAULT_WEIGHT_QUANT

    @model_validator(mode="after")
    def _check_nodes(self) -> Self:
        if self.node_ids is not None:
            if not self.node_ids:
                raise ValueError("node_ids, when given, must name at least one node")
            if len(set(self.node_ids)) != len(self.node_ids):
                raise ValueError(f"node_ids names a node twice: {', '.join(self.node_ids)}")
            if self.min_nodes > len(self.node_ids):
                raise ValueError(
                    f"min_nodes is {self.min_nodes} but node_ids names only {len(self.node_ids)} nodes"
                )
        return self


class ShardAssignment(FrozenModel):
    """One runner's part of an instance: rank `rank` of `world_size` in the instance's group, holding
    layers [layer_start, layer_end) and tensor-parallel slice `tp_rank` of `tp_size`, on `device` of
    `node_id`. `kv_cache_bytes` is the KV-cache budget the runner sizes its cache with."""

    node_id: NodeIdField
    runner_id: RunnerIdField
    rank: Annotated[int, Field(ge=0)]
    world_size: Positive
    layer_start: Annotated[int, Field(ge=0)]
    layer_end: Positive
    tp_rank: Annotated[int, Field(ge=0)]
    tp_size: Positive
    device: Device
    weight_bytes: Bytes
    kv_cache_bytes: Bytes

    @model_validator(mode="after")
    def _check_ranges(self) -> Self:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of size {self.world_size}")
        if self.tp_rank >= self.tp_size:
            raise ValueError(
                f"tp_rank {self.tp_rank} is outside a tensor-parallel group of size {self.tp_size}"
            )
        if self.layer_start >= self.layer_end:
            raise ValueError(f"layer range [{self.layer_start}, {self.layer_end}) is empty")
        return self

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


class GroupAddress(FrozenModel):
    """Where rank 0 of an instance listens for the other ranks (the `torch.distributed` TCP store)."""

    host: Host
    port: Annotated[int, Field(ge=1, le=65535)]


class Instance(FrozenModel):
    """`quant`: the weight quantization every runner applies after loading its shard (instances recorded
    before it existed ran unquantized, hence that default here; requests default to DEFAULT_WEIGHT_QUANT)."""

    instance_id: InstanceIdField
    card: ModelCard
    sharding: Sharding
    backend: CommBackend
    shards: tuple[ShardAssignment, ...]
    rendezvous: GroupAddress
    quant: WeightQuant = "none"

    @model_validator(mode="after")
    def _check_shards(self) -> Self:
        shards = self.shards
        world = len(shards)
        if world == 0:
            raise ValueError("an instance needs at least one shard")
        for expected_rank, shard in enumerate(shards):
            if shard.rank != expected_rank or shard.world_size != world:
                raise ValueError(
                    f"shard {expected_rank} has rank {shard.rank} of {shard.world_size}; "
                    f"shards must be ranks 0..{world - 1} of {world}, in order"
                )
        if len({shard.node_id for shard in shards}) != world:
            raise ValueError("an instance holds at most one shard per node")
        if len({shard.runner_id for shard in shards}) != world:
            raise ValueError("runner ids of an instance must be unique")
        if self.backend == "nccl" and any(not shard.device.startswith("cuda") for shard in shards):
            raise ValueError("backend nccl needs every shard on a CUDA device")
        num_layers = self.card.num_layers
        if self.sharding == "pipeline":
            start = 0
            for shard in shards:
                if shard.tp_size != 1 or shard.layer_start != start:
                    raise ValueError(
                        f"pipeline shard {shard.rank} must start at layer {start} with tp_size 1, "
                        f"got layer {shard.layer_start} and tp_size {shard.tp_size}"
                    )
                start = shard.layer_end
            if start != num_layers:
                raise ValueError(f"pipeline stages end at layer {start}, the model has {num_layers}")
        else:
            for shard in shards:
                if (shard.layer_start, shard.layer_end) != (0, num_layers) or (
                    shard.tp_rank,
                    shard.tp_size,
                ) != (shard.rank, world):
                    raise ValueError(
                        f"tensor shard {shard.rank} must hold layers [0, {num_layers}) as tp rank "
                        f"{shard.rank} of {world}"
                    )
        return self

    @property
    def node_ids(self) -> tuple[NodeId, ...]:
        return tuple(shard.node_id for shard in self.shards)

    @property
    def runner_ids(self) -> tuple[RunnerId, ...]:
        return tuple(shard.runner_id for shard in self.shards)

    def shard_on(self, node_id: NodeId) -> ShardAssignment | None:
        return next((shard for shard in self.shards if shard.node_id == node_id), None)


class NodeMemoryUse(FrozenModel):
    """What one shard of a placement would take on its node, next to what the node has free."""

    node_id: NodeIdField
    device: Device
    rank: Annotated[int, Field(ge=0)]
    layer_start: Annotated[int, Field(ge=0)]
    layer_end: Positive
    tp_size: Positive
    weight_bytes: Bytes
    kv_cache_bytes: Bytes
    overhead_bytes: Bytes
    free_bytes: Bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.overhead_bytes


class PlacementPreview(FrozenModel):
    """One feasible placement. Sending `request` as a placement gives exactly this placement while the
    nodes' free memory does not change."""

    request: PlacementRequest
    sharding: Sharding
    backend: CommBackend
    memory: tuple[NodeMemoryUse, ...]

    @property
    def node_ids(self) -> tuple[NodeId, ...]:
        return tuple(use.node_id for use in self.memory)

    @property
    def total_bytes(self) -> int:
        return sum(use.total_bytes for use in self.memory)

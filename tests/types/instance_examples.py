"""Examples of the instance family (cards, instances, their commands and events), shared by the union
tests (type_examples) and the instance type tests."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from shoal.types.ids import NodeId
from shoal.types.instance_ids import InstanceId, runner_id_for
from shoal.types.instance_messages import (
    CreateInstance,
    DeleteInstance,
    InstanceCreated,
    InstanceDeleted,
    PlaceInstance,
    ReportRunnerStatus,
    RunnerStatusChanged,
)
from shoal.types.instances import GroupAddress, Instance, ModelCard, PlacementRequest, ShardAssignment
from shoal.types.runners import RunnerFailed, RunnerLoading

NODE_A = NodeId("0123456789abcdef0123456789abcdef")
NODE_B = NodeId("fedcba9876543210fedcba9876543210")

IID = InstanceId("0f1e2d3c4b5a69788796a5b4c3d2e1f0")

CARD = ModelCard(
    model_id="smollm2-135m",
    source="/models/smollm2.gguf",
    architecture="LlamaForCausalLM",
    dtype="bfloat16",
    num_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    vocab_size=49152,
    context_length=8192,
    tie_word_embeddings=True,
    layer_bytes=7_000_000,
    embedding_bytes=56_623_104,
    head_bytes=56_624_256,
)


def shard(rank: int, node: str, start: int, end: int, world: int = 2, **changes: Any) -> ShardAssignment:
    fields: dict[str, Any] = {
        "node_id": node,
        "runner_id": runner_id_for(IID, rank),
        "rank": rank,
        "world_size": world,
        "layer_start": start,
        "layer_end": end,
        "tp_rank": 0,
        "tp_size": 1,
        "device": "cpu",
        "weight_bytes": 1000,
        "kv_cache_bytes": 100,
    }
    fields.update(changes)
    return ShardAssignment.model_validate(fields)


def instance(**changes: Any) -> Instance:
    fields: dict[str, Any] = {
        "instance_id": IID,
        "card": CARD,
        "sharding": "pipeline",
        "backend": "gloo",
        "shards": (shard(0, NODE_A, 0, 18), shard(1, NODE_B, 18, 30)),
        "rendezvous": GroupAddress(host="127.0.0.1", port=29500),
    }
    fields.update(changes)
    return Instance.model_validate(fields)


INSTANCE = instance()
REQUEST = PlacementRequest(
    model_id="smollm2-135m", sharding="pipeline", min_nodes=2, node_ids=(NODE_A, NODE_B)
)

MESSAGE_EXAMPLES: dict[type[BaseModel], BaseModel] = {
    PlaceInstance: PlaceInstance(model=CARD, request=REQUEST),
    CreateInstance: CreateInstance(instance=INSTANCE),
    DeleteInstance: DeleteInstance(instance_id=IID),
    ReportRunnerStatus: ReportRunnerStatus(
        runner_id=runner_id_for(IID, 1),
        instance_id=IID,
        node_id=NODE_B,
        status=RunnerLoading(layers_done=2, layers_total=12),
    ),
    InstanceCreated: InstanceCreated(instance=INSTANCE),
    InstanceDeleted: InstanceDeleted(instance_id=IID, reason="runner inst-r1 failed: exited with code 1"),
    RunnerStatusChanged: RunnerStatusChanged(
        runner_id=runner_id_for(IID, 0), instance_id=IID, node_id=NODE_A, status=RunnerFailed(reason="oom")
    ),
}

"""Model cards, node records and requests for the placement tests (plain data)."""

from __future__ import annotations

from typing import Any

from shoal.master.placement import (
    PlacementError,
    place,
)
from shoal.master.shard_memory import RUNNER_OVERHEAD_BYTES
from shoal.types import ApiAddress, GpuInfo, NetworkInterface, NodeId, NodeProfile, NodeRecord
from shoal.types.instance_ids import InstanceId
from shoal.types.instances import Instance, ModelCard, PlacementRequest

MB = 10**6
GB = 10**9
OVERHEAD = RUNNER_OVERHEAD_BYTES
IID = InstanceId("inst1")


def make_card(**changes: Any) -> ModelCard:
    fields: dict[str, Any] = {
        "model_id": "test-model",
        "source": "/models/test",
        "architecture": "LlamaForCausalLM",
        "dtype": "bfloat16",
        "num_layers": 12,
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_heads": 8,
        "num_kv_heads": 4,
        "head_dim": 64,
        "vocab_size": 32000,
        "context_length": 2048,
        "tie_word_embeddings": False,
        "layer_bytes": 100 * MB,
        "embedding_bytes": 50 * MB,
        "head_bytes": 50 * MB,
    }
    fields.update(changes)
    return ModelCard.model_validate(fields)


CARD = make_card()
# 12 layers of 100 MB, 50 MB embedding, 50 MB head, no KV: one process needs this much.
SINGLE_NEED = 1300 * MB + OVERHEAD


def make_node(
    node_id: str,
    free: int,
    *,
    gpus: tuple[int, ...] = (),
    status: str = "active",
    host: str = "127.0.0.1",
    backends: tuple[str, ...] | None = None,
    rtts: dict[str, float] | None = None,
) -> NodeRecord:
    gpu_infos = tuple(
        GpuInfo(index=i, name="gpu", memory_total_bytes=max(g, 1) * 2, memory_free_bytes=g)
        for i, g in enumerate(gpus)
    )
    profile = NodeProfile.model_validate(
        {
            "node_id": node_id,
            "hostname": f"host-{node_id}",
            "memory_total_bytes": 2 * free + 1,
            "memory_available_bytes": free,
            "cpu_model": "cpu",
            "num_cpu_cores": 4,
            "num_cpu_threads": 8,
            "gpus": gpu_infos,
            "backends": backends or (("cpu", "cuda") if gpus else ("cpu",)),
            "disk_free_bytes": 10 * GB,
            "network_interfaces": (NetworkInterface(name="eth0", addresses=("10.0.0.9", "fe80::1")),),
            "api_address": ApiAddress(host=host, port=8000),
            "shoal_version": "0.1.0",
            "started_at": 1.0,
            "link_rtts_ms": rtts or {},
        }
    )
    return NodeRecord(profile=profile, status=status, joined_at_index=1)  # type: ignore[arg-type]


def cluster(*records: NodeRecord) -> dict[NodeId, NodeRecord]:
    return {record.profile.node_id: record for record in records}


def request(**changes: Any) -> PlacementRequest:
    fields: dict[str, Any] = {"model_id": "test-model", "kv_headroom_tokens": 0}
    fields.update(changes)
    if "node_ids" in fields:
        fields["node_ids"] = tuple(fields["node_ids"])
    return PlacementRequest.model_validate(fields)


def placed(card: ModelCard, nodes: dict[NodeId, NodeRecord], req: PlacementRequest, **kw: Any) -> Instance:
    result = place(card, nodes, kw.pop("links", {}), req, instance_id=IID, **kw)
    assert isinstance(result, Instance), result
    return result


def failed(card: ModelCard, nodes: dict[NodeId, NodeRecord], req: PlacementRequest) -> str:
    result = place(card, nodes, {}, req, instance_id=IID)
    assert isinstance(result, PlacementError), result
    return result.reason


def layer_counts(instance: Instance) -> list[int]:
    return [shard.layer_end - shard.layer_start for shard in instance.shards]


# --- one node, splits, proportions ---------------------------------------------------------------

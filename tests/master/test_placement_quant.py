"""Placement on plain data: weight quantization in the memory a shard needs."""

from __future__ import annotations

from placement_helpers import (
    GB,
    OVERHEAD,
    cluster,
    failed,
    make_card,
    make_node,
    placed,
    request,
)

from shoal.master.placement import (
    previews,
)
from shoal.master.shard_memory import format_bytes
from shoal.types import NodeId
from shoal.types.instances import PlacementRequest

DENSE_LAYER = (2048 * 2048 * 2 + 2 * 2048 * 512 + 3 * 2048 * 5632) * 2
SHAPED = make_card(
    hidden_size=2048,
    intermediate_size=5632,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    num_layers=16,
    layer_bytes=DENSE_LAYER + 2 * 2048 * 2,  # + two norms
    embedding_bytes=32000 * 2048 * 2,
    head_bytes=32000 * 2048 * 2 + 2048 * 2,  # + the final norm
)


def test_the_request_default_is_auto_quantization_counted_as_unquantized() -> None:
    assert PlacementRequest(model_id="m").quant == "auto"
    nodes = cluster(make_node("a", 8 * GB))
    auto = placed(SHAPED, nodes, request())
    none = placed(SHAPED, nodes, request(quant="none"))
    assert auto.quant == "auto" and none.quant == "none"
    assert auto.shards[0].weight_bytes == none.shards[0].weight_bytes == SHAPED.weight_bytes


def test_int8_weights_take_about_half_of_bf16_and_fit_where_bf16_does_not() -> None:
    int8 = placed(SHAPED, cluster(make_node("a", 8 * GB)), request(quant="int8"))
    assert int8.quant == "int8"
    weights = int8.shards[0].weight_bytes
    # matmul weights 1 byte per element + a bf16 scale per row; norms and the embedding stay bf16
    assert 0.5 * SHAPED.weight_bytes < weights < 0.55 * SHAPED.weight_bytes
    small = cluster(make_node("a", weights + OVERHEAD))
    assert placed(SHAPED, small, request(quant="int8")).node_ids == (NodeId("a"),)
    reason = failed(SHAPED, small, request(quant="none"))
    assert f"weights {format_bytes(SHAPED.weight_bytes)}" in reason


def test_quantized_pipeline_and_tensor_shards_count_their_quantized_weights() -> None:
    nodes = cluster(make_node("a", 8 * GB), make_node("b", 8 * GB))
    pipeline = placed(SHAPED, nodes, request(min_nodes=2, sharding="pipeline", quant="int4"))
    tensor = placed(SHAPED, nodes, request(min_nodes=2, sharding="tensor", quant="int4"))
    single = placed(SHAPED, cluster(make_node("a", 8 * GB)), request(quant="int4")).shards[0].weight_bytes
    # the stages split the single shard's weights (the head is untied: no copy)
    assert sum(s.weight_bytes for s in pipeline.shards) == single
    # each tensor rank holds half of every matrix (rounded up)
    assert all(abs(s.weight_bytes - single / 2) <= 2 for s in tensor.shards)
    assert pipeline.quant == tensor.quant == "int4"


def test_previews_count_the_asked_quantization() -> None:
    nodes = cluster(make_node("a", 8 * GB))
    (plain,) = previews(SHAPED, nodes, {}, kv_headroom_tokens=0, quant="none")
    (int8,) = previews(SHAPED, nodes, {}, kv_headroom_tokens=0, quant="int8")
    assert int8.request.quant == "int8" and plain.request.quant == "none"
    assert int8.memory[0].weight_bytes < 0.55 * plain.memory[0].weight_bytes

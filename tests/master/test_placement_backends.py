"""Placement on plain data: tensor parallelism (dividing heads and widths) and backends (NCCL only where every
node has a GPU, never a downgrade; MPS on a Mac)."""

from __future__ import annotations

from placement_helpers import (
    CARD,
    GB,
    MB,
    OVERHEAD,
    cluster,
    failed,
    make_card,
    make_node,
    placed,
    request,
)

from shoal.master.shard_memory import format_bytes


def test_tensor_parallel_splits_heads_and_memory_evenly() -> None:
    nodes = cluster(make_node("a", 1 * GB), make_node("b", 1 * GB))
    instance = placed(CARD, nodes, request(sharding="tensor", kv_headroom_tokens=64))
    assert instance.sharding == "tensor"
    assert [(s.rank, s.tp_rank, s.tp_size, s.layer_start, s.layer_end) for s in instance.shards] == [
        (0, 0, 2, 0, 12),
        (1, 1, 2, 0, 12),
    ]
    assert all(s.weight_bytes == 650 * MB for s in instance.shards)
    assert all(s.kv_cache_bytes == 64 * CARD.kv_bytes_per_token // 2 for s in instance.shards)


def test_tensor_parallel_needs_dividing_heads() -> None:
    card = make_card(num_kv_heads=3, num_heads=9)
    nodes = cluster(make_node("a", 1 * GB), make_node("b", 1 * GB))
    reason = failed(card, nodes, request(sharding="tensor", node_ids=["a", "b"]))
    assert "tensor parallel needs num_heads (9), num_kv_heads (3) divisible by world size 2" in reason


def test_tensor_parallel_needs_dividing_mlp_width() -> None:
    card = make_card(intermediate_size=1001)
    reason = failed(card, cluster(make_node("a", 1 * GB), make_node("b", 1 * GB)), request(sharding="tensor"))
    assert "intermediate_size (1001)" in reason


def test_tensor_parallel_names_the_nodes_that_are_short() -> None:
    nodes = cluster(make_node("a", 2 * GB), make_node("b", 500 * MB))
    reason = failed(CARD, nodes, request(sharding="tensor", node_ids=["a", "b"]))
    assert f"needs {format_bytes(650 * MB + OVERHEAD)} on each node" in reason
    assert "short: b has 500.0 MB free" in reason


def test_auto_uses_tensor_when_pipeline_cannot_fit() -> None:
    # a 1-layer model cannot be a 2-stage pipeline, and neither node holds it alone
    card = make_card(num_layers=1, layer_bytes=1 * GB)
    nodes = cluster(make_node("a", 900 * MB), make_node("b", 900 * MB))
    instance = placed(card, nodes, request())
    assert instance.sharding == "tensor" and len(instance.shards) == 2


# --- backends ------------------------------------------------------------------------------------


def test_nccl_without_gpus_is_an_error_naming_the_nodes() -> None:
    nodes = cluster(make_node("a", 8 * GB), make_node("b", 8 * GB))
    reason = failed(CARD, nodes, request(backend="nccl", node_ids=["a", "b"]))
    assert reason == "backend nccl needs a GPU on every node; nodes without: a, b"
    reason = failed(CARD, nodes, request(backend="nccl"))
    assert reason.startswith("backend nccl needs a GPU on every node; 0 of 2 active nodes have one")


def test_nccl_is_never_downgraded_when_one_listed_node_lacks_a_gpu() -> None:
    nodes = cluster(make_node("a", 8 * GB, gpus=(8 * GB,)), make_node("b", 8 * GB))
    reason = failed(CARD, nodes, request(backend="nccl", node_ids=["a", "b"]))
    assert reason == "backend nccl needs a GPU on every node; nodes without: b"


def test_nccl_uses_only_gpu_nodes_and_their_gpu_memory() -> None:
    nodes = cluster(
        make_node("a", 64 * GB),  # lots of RAM, no GPU
        make_node("b", 1 * GB, gpus=(500 * MB, 1 * GB)),
        make_node("c", 1 * GB, gpus=(1 * GB,)),
    )
    instance = placed(CARD, nodes, request(backend="nccl"))
    assert instance.backend == "nccl"
    assert sorted((s.node_id, s.device) for s in instance.shards) == [("b", "cuda:1"), ("c", "cuda:0")]
    reason = failed(CARD, nodes, request(backend="nccl", min_nodes=3))
    assert "2 of 3 active nodes have one" in reason and "nodes without: a" in reason


def test_nccl_too_little_gpu_memory_is_a_memory_error_not_gloo() -> None:
    nodes = cluster(make_node("a", 64 * GB, gpus=(500 * MB,)), make_node("b", 64 * GB, gpus=(500 * MB,)))
    reason = failed(CARD, nodes, request(backend="nccl"))
    assert "(nccl)" in reason and "free together" in reason and "(gloo)" not in reason


def test_auto_prefers_nccl_when_every_chosen_node_has_a_gpu() -> None:
    gpu_nodes = cluster(make_node("a", 4 * GB, gpus=(4 * GB,)))
    assert placed(CARD, gpu_nodes, request()).backend == "nccl"
    # not enough GPU memory alone: auto falls to the CPU of the same node rather than failing
    small_gpu = cluster(make_node("a", 4 * GB, gpus=(1 * GB,)))
    instance = placed(CARD, small_gpu, request())
    assert instance.backend == "gloo" and instance.shards[0].device == "cpu"
    mixed = cluster(make_node("a", 1 * GB, gpus=(4 * GB,)), make_node("b", 1 * GB))
    assert placed(CARD, mixed, request(node_ids=["a", "b"])).backend == "gloo"


def test_gloo_on_a_mac_runs_on_mps() -> None:
    nodes = cluster(make_node("mac", 4 * GB, backends=("cpu", "mps")))
    assert placed(CARD, nodes, request(backend="gloo")).shards[0].device == "mps"


# --- node selection ------------------------------------------------------------------------------

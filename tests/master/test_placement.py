"""Placement on plain data: where shards go, how layers split, and what an impossible request says."""

from __future__ import annotations

import itertools

import pytest
from placement_helpers import (
    CARD,
    GB,
    IID,
    MB,
    OVERHEAD,
    SINGLE_NEED,
    cluster,
    failed,
    layer_counts,
    make_card,
    make_node,
    placed,
    request,
)

from shoal.master.placement import (
    RENDEZVOUS_PORT_BASE,
    RENDEZVOUS_PORT_COUNT,
    PlacementError,
    place,
    previews,
    split_layers,
)
from shoal.master.shard_memory import format_bytes
from shoal.types.instance_ids import InstanceId
from shoal.types.instances import GroupAddress, Instance


def test_fits_on_one_node_picks_the_node_with_most_free_memory() -> None:
    nodes = cluster(make_node("a", 2 * GB), make_node("b", 3 * GB), make_node("c", 1 * GB))
    instance = placed(CARD, nodes, request())
    assert instance.sharding == "pipeline" and instance.backend == "gloo"
    (shard,) = instance.shards
    assert (shard.node_id, shard.device, shard.layer_start, shard.layer_end) == ("b", "cpu", 0, 12)
    assert (shard.rank, shard.world_size, shard.tp_rank, shard.tp_size) == (0, 1, 0, 1)
    assert shard.weight_bytes == 1300 * MB and shard.kv_cache_bytes == 0
    assert shard.runner_id == "inst1-r0"
    assert instance.rendezvous.host == "127.0.0.1"
    assert RENDEZVOUS_PORT_BASE <= instance.rendezvous.port < RENDEZVOUS_PORT_BASE + RENDEZVOUS_PORT_COUNT


def test_exactly_enough_memory_fits_and_one_byte_less_does_not() -> None:
    assert placed(CARD, cluster(make_node("a", SINGLE_NEED)), request()).node_ids == ("a",)
    reason = failed(CARD, cluster(make_node("a", SINGLE_NEED - 1)), request())
    assert "node a has" in reason


def test_must_split_when_no_node_fits_alone() -> None:
    nodes = cluster(make_node("a", 1 * GB), make_node("b", 1 * GB))
    instance = placed(CARD, nodes, request())
    assert instance.sharding == "pipeline"
    assert sorted(instance.node_ids) == ["a", "b"]
    assert [(s.layer_start, s.layer_end) for s in instance.shards] == [(0, 6), (6, 12)]
    first, last = instance.shards
    assert first.weight_bytes == 6 * 100 * MB + 50 * MB  # layers + embedding
    assert last.weight_bytes == 6 * 100 * MB + 50 * MB  # layers + norm and head


def test_pipeline_splits_layers_in_proportion_to_free_memory() -> None:
    nodes = cluster(make_node("a", 3 * GB), make_node("b", 1 * GB))
    instance = placed(CARD, nodes, request(sharding="pipeline", min_nodes=2))
    assert instance.node_ids == ("a", "b")
    assert layer_counts(instance) == [9, 3]


def test_pipeline_split_respects_what_each_node_can_hold() -> None:
    # b can hold 3 layers once its head and the runner overhead are counted; proportion alone gives it 4
    nodes = cluster(make_node("a", 1500 * MB), make_node("b", 700 * MB))
    instance = placed(CARD, nodes, request(sharding="pipeline", min_nodes=2))
    assert layer_counts(instance) == [9, 3]
    for shard, node in zip(instance.shards, (1500 * MB, 700 * MB), strict=True):
        assert shard.weight_bytes + shard.kv_cache_bytes + OVERHEAD <= node


def test_every_stage_gets_at_least_one_layer() -> None:
    nodes = cluster(make_node("a", 100 * GB), make_node("b", 500 * MB))
    instance = placed(CARD, nodes, request(sharding="pipeline", min_nodes=2))
    assert layer_counts(instance) == [11, 1]


@pytest.mark.parametrize(
    ("num_layers", "num_nodes", "expected"),
    [(7, 2, [4, 3]), (5, 3, [2, 2, 1]), (13, 4, [4, 3, 3, 3]), (3, 3, [1, 1, 1])],
)
def test_odd_layer_counts_split_evenly_on_equal_nodes(
    num_layers: int, num_nodes: int, expected: list[int]
) -> None:
    card = make_card(num_layers=num_layers)
    nodes = cluster(*(make_node(name, 2 * GB) for name in "abcd"[:num_nodes]))
    instance = placed(card, nodes, request(sharding="pipeline", min_nodes=num_nodes))
    assert layer_counts(instance) == expected
    assert instance.shards[-1].layer_end == num_layers


def test_split_layers_properties_on_many_inputs() -> None:
    for num_layers, weights, caps in itertools.product(
        (3, 7, 16, 31), ((1, 1, 1), (5, 1, 1), (1, 2, 3), (0, 0, 1)), ((1, 40, 40), (40, 40, 40), (10, 3, 30))
    ):
        if not (len(weights) <= num_layers <= sum(caps)):
            continue
        parts = split_layers(num_layers, weights, caps)
        assert sum(parts) == num_layers
        assert all(1 <= part <= cap for part, cap in zip(parts, caps, strict=True)), (parts, caps)


def test_more_nodes_than_layers_is_an_error() -> None:
    card = make_card(num_layers=2)
    nodes = cluster(*(make_node(name, 2 * GB) for name in "abc"))
    reason = failed(card, nodes, request(sharding="pipeline", node_ids=["a", "b", "c"]))
    assert "needs at least 3 layers; the model has 2" in reason


# --- memory and KV headroom ----------------------------------------------------------------------


def test_too_little_memory_says_how_much_is_needed_and_how_much_is_free() -> None:
    nodes = cluster(make_node("a", 500 * MB), make_node("b", 600 * MB))
    reason = failed(CARD, nodes, request(sharding="pipeline"))
    needed = 1300 * MB + 2 * OVERHEAD
    assert f"needs {format_bytes(needed)}" in reason
    assert f"the 2 nodes have {format_bytes(1100 * MB)} free together" in reason
    assert "weights 1.3 GB" in reason


def test_node_that_cannot_hold_one_layer_is_named() -> None:
    nodes = cluster(make_node("a", 100 * GB), make_node("b", 300 * MB))
    reason = failed(CARD, nodes, request(sharding="pipeline", node_ids=["a", "b"]))
    assert "b has 300.0 MB free" in reason and "cannot hold even one layer" in reason


def test_kv_headroom_counts_in_the_memory_needed() -> None:
    kv_per_token = CARD.kv_bytes_per_token  # 12 layers * 2 * 4 heads * 64 * 2 bytes
    assert kv_per_token == 12 * 1024
    tokens = 1000
    need = SINGLE_NEED + tokens * kv_per_token
    instance = placed(CARD, cluster(make_node("a", need)), request(kv_headroom_tokens=tokens))
    assert instance.shards[0].kv_cache_bytes == tokens * kv_per_token
    assert isinstance(
        place(
            CARD, cluster(make_node("a", need - 1)), {}, request(kv_headroom_tokens=tokens), instance_id=IID
        ),
        PlacementError,
    )


def test_default_kv_headroom_is_capped_at_the_context_length() -> None:
    instance = placed(CARD, cluster(make_node("a", 8 * GB)), request(kv_headroom_tokens=None))
    assert instance.shards[0].kv_cache_bytes == 2048 * CARD.kv_bytes_per_token


def test_pipeline_stage_kv_covers_only_its_own_layers() -> None:
    nodes = cluster(make_node("a", 1 * GB), make_node("b", 1 * GB))
    instance = placed(CARD, nodes, request(kv_headroom_tokens=100))
    for shard in instance.shards:
        assert shard.kv_cache_bytes == 100 * shard.num_layers * CARD.kv_bytes_per_token_per_layer


def test_tied_embeddings_are_held_once_on_one_node_and_copied_to_the_last_stage() -> None:
    card = make_card(tie_word_embeddings=True)
    one = placed(card, cluster(make_node("a", 4 * GB)), request(quant="none"))
    assert one.shards[0].weight_bytes == 12 * 100 * MB + 50 * MB  # head shares the embedding
    nodes = cluster(make_node("a", 1 * GB), make_node("b", 1 * GB))
    two = placed(card, nodes, request(min_nodes=2, quant="none"))
    assert [s.weight_bytes for s in two.shards] == [650 * MB, 650 * MB]
    # "auto" may quantize the head, which then holds a kernel next to the embedding's floats: both count
    auto = placed(card, cluster(make_node("a", 4 * GB)), request())
    assert auto.shards[0].weight_bytes == 12 * 100 * MB + 2 * 50 * MB


# --- tensor parallel -----------------------------------------------------------------------------


def test_explicit_node_list_with_unknown_and_timed_out_nodes() -> None:
    nodes = cluster(make_node("a", 8 * GB), make_node("b", 8 * GB, status="timed_out"))
    reason = failed(CARD, nodes, request(node_ids=["a", "b", "zz"]))
    assert "unknown node(s): zz" in reason and "node(s) timed out: b" in reason


def test_explicit_node_list_uses_exactly_those_nodes() -> None:
    nodes = cluster(make_node("a", 8 * GB), make_node("b", 8 * GB), make_node("c", 8 * GB))
    instance = placed(CARD, nodes, request(node_ids=["c", "b"]))
    assert sorted(instance.node_ids) == ["b", "c"]


def test_timed_out_nodes_are_never_chosen() -> None:
    nodes = cluster(make_node("a", 64 * GB, status="timed_out"), make_node("b", 2 * GB))
    assert placed(CARD, nodes, request()).node_ids == ("b",)


def test_min_nodes_forces_a_split_even_when_one_node_fits() -> None:
    nodes = cluster(make_node("a", 8 * GB), make_node("b", 8 * GB), make_node("c", 8 * GB))
    assert len(placed(CARD, nodes, request(min_nodes=2)).shards) == 2
    assert len(placed(CARD, nodes, request(min_nodes=3, sharding="pipeline")).shards) == 3
    reason = failed(CARD, nodes, request(min_nodes=4))
    assert reason == "min_nodes is 4 but only 3 node(s) are active (a, b, c)"


def test_min_nodes_larger_than_the_node_list_is_rejected_by_the_request() -> None:
    with pytest.raises(ValueError, match="min_nodes is 3 but node_ids names only 2"):
        request(node_ids=["a", "b"], min_nodes=3)


def test_wrong_model_card_is_an_error() -> None:
    reason = failed(make_card(model_id="other"), cluster(make_node("a", 8 * GB)), request())
    assert "'test-model'" in reason and "'other'" in reason


def test_rank_order_follows_the_fastest_ring() -> None:
    fast, slow = 0.1, 5.0
    rtt = {
        ("a", "b"): fast,
        ("b", "c"): fast,
        ("c", "d"): fast,
        ("d", "a"): fast,
        ("a", "c"): slow,
        ("b", "d"): slow,
    }
    links = {n: {} for n in "abcd"}
    for (x, y), value in rtt.items():
        links[x][y] = value
    # memory order would be a, c, b, d: a ring with two slow links
    nodes = cluster(
        make_node("a", 1000 * MB),
        make_node("b", 920 * MB),
        make_node("c", 950 * MB),
        make_node("d", 900 * MB),
    )
    instance = placed(CARD, nodes, request(sharding="pipeline", node_ids=list("abcd")), links=links)
    assert instance.node_ids == ("a", "b", "c", "d")
    without_links = placed(CARD, nodes, request(sharding="pipeline", node_ids=list("abcd")))
    assert without_links.node_ids == ("a", "c", "b", "d")


def test_rendezvous_uses_rank_zero_host_and_a_port_no_instance_uses() -> None:
    nodes = cluster(make_node("a", 8 * GB, host="10.1.1.1"))
    first = placed(CARD, nodes, request())
    second = placed(CARD, nodes, request(), existing=[first])  # the same instance id: the same start
    assert first.rendezvous.host == "10.1.1.1"
    assert (
        second.rendezvous.port == first.rendezvous.port + 1 or second.rendezvous.port == RENDEZVOUS_PORT_BASE
    )


def test_the_next_instance_does_not_reuse_the_port_of_one_just_deleted() -> None:
    """Its rank 0 may hold the port while it shuts down: each instance id draws its own start in the range."""
    nodes = cluster(make_node("a", 8 * GB))
    ports = set()
    for n in range(20):  # each placed after the one before was deleted: no existing instance
        result = place(CARD, nodes, {}, request(), instance_id=InstanceId(f"instance-{n}"))
        assert isinstance(result, Instance), result
        assert RENDEZVOUS_PORT_BASE <= result.rendezvous.port < RENDEZVOUS_PORT_BASE + RENDEZVOUS_PORT_COUNT
        ports.add(result.rendezvous.port)
    assert len(ports) >= 18
    # every port of the range is used before placement says none is left
    base = placed(CARD, nodes, request())
    host = base.rendezvous.host
    last = RENDEZVOUS_PORT_BASE + RENDEZVOUS_PORT_COUNT - 1
    used = [
        base.model_copy(update={"rendezvous": GroupAddress(host=host, port=port)})
        for port in range(RENDEZVOUS_PORT_BASE, last)
    ]
    assert placed(CARD, nodes, request(), existing=used).rendezvous.port == last
    full = [*used, base.model_copy(update={"rendezvous": GroupAddress(host=host, port=last)})]
    reason = place(CARD, nodes, {}, request(), instance_id=IID, existing=full)
    assert isinstance(reason, PlacementError) and "no free rendezvous port" in reason.reason


def test_wildcard_api_host_falls_back_to_an_interface_address() -> None:
    nodes = cluster(make_node("a", 8 * GB, host="0.0.0.0"))
    assert placed(CARD, nodes, request()).rendezvous.host == "10.0.0.9"


def test_placement_is_deterministic() -> None:
    nodes = cluster(*(make_node(name, (i + 1) * 300 * MB) for i, name in enumerate("abcde")))
    results = {placed(CARD, dict(reversed(list(nodes.items()))), request()) for _ in range(3)}
    results.add(placed(CARD, nodes, request()))
    assert len(results) == 1


# --- previews ------------------------------------------------------------------------------------


def test_previews_list_every_feasible_placement_and_no_infeasible_one() -> None:
    card = make_card(num_heads=8, num_kv_heads=2)
    nodes = cluster(
        make_node("a", 1 * GB, gpus=(2 * GB,)),
        make_node("b", 800 * MB),
        make_node("c", 2 * GB, gpus=(600 * MB,)),
        make_node("d", 9 * GB, status="timed_out"),
    )
    found = previews(card, nodes, {}, kv_headroom_tokens=0)
    keys = {(tuple(sorted(p.node_ids)), p.sharding, p.backend) for p in found}
    assert len(keys) == len(found)
    expected = set()
    for size in (1, 2, 3):
        for subset in itertools.combinations("abc", size):
            for sharding in ("pipeline", "tensor") if size > 1 else ("pipeline",):
                for backend in ("gloo", "nccl"):
                    req = request(node_ids=list(subset), sharding=sharding, backend=backend, min_nodes=size)
                    if isinstance(place(card, nodes, {}, req, instance_id=IID), Instance):
                        expected.add((subset, sharding, backend))
    assert keys == expected
    # the cases this cluster should include and exclude
    assert (("a",), "pipeline", "nccl") in keys  # a's GPU holds the model
    assert (("c",), "pipeline", "gloo") in keys
    assert (("b",), "pipeline", "gloo") not in keys  # too small alone
    assert not any("b" in subset and backend == "nccl" for subset, _, backend in keys)  # b has no GPU
    assert not any("d" in subset for subset, _, _ in keys)  # timed out
    for preview in found:
        assert all(use.total_bytes <= use.free_bytes for use in preview.memory)
        assert sum(use.layer_end - use.layer_start for use in preview.memory) == (
            card.num_layers if preview.sharding == "pipeline" else card.num_layers * len(preview.memory)
        )
        # sending the preview's request gives exactly that placement
        again = placed(card, nodes, preview.request)
        assert again.node_ids == preview.node_ids and again.backend == preview.backend
        assert [(s.layer_start, s.layer_end) for s in again.shards] == [
            (u.layer_start, u.layer_end) for u in preview.memory
        ]
    sizes = [len(p.memory) for p in found]
    assert sizes == sorted(sizes)


def test_previews_are_empty_when_nothing_fits() -> None:
    assert previews(CARD, cluster(make_node("a", 100 * MB), make_node("b", 100 * MB)), {}) == []


def test_nccl_memory_error_is_reported_when_some_nodes_lack_gpus() -> None:
    nodes = cluster(
        make_node("a", 64 * GB),
        make_node("b", 1 * GB, gpus=(300 * MB,)),
        make_node("c", 1 * GB, gpus=(300 * MB,)),
    )
    reason = failed(CARD, nodes, request(backend="nccl"))
    assert "over 2 nodes (nccl): needs" in reason and "free together" in reason


# A card whose byte counts follow its shape (bf16): hidden 2048, MLP 5632, 32/8 heads, vocabulary 32000.

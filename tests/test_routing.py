"""pick_instance on plain states: serving instances only, fewest in flight, loading vs unknown."""

from __future__ import annotations

from shoal.routing import NoInstance, pick_instance
from shoal.state import apply_all
from shoal.types import (
    ApiAddress,
    Event,
    IndexedEvent,
    MasterElected,
    NodeId,
    NodeJoined,
    NodeProfile,
    State,
    Term,
)
from shoal.types.instance_ids import InstanceId, runner_id_for
from shoal.types.instance_messages import InstanceCreated, RunnerStatusChanged
from shoal.types.instances import GroupAddress, Instance, ModelCard, ShardAssignment
from shoal.types.runners import RunnerFailed, RunnerLoading, RunnerReady, RunnerRunning, RunnerStatus

A = NodeId("a")


def card(model_id: str) -> ModelCard:
    return ModelCard(
        model_id=model_id,
        source=f"/models/{model_id}",
        architecture="LlamaForCausalLM",
        dtype="float32",
        num_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=256,
        context_length=256,
        tie_word_embeddings=False,
        layer_bytes=1,
        embedding_bytes=1,
        head_bytes=1,
    )


def instance(instance_id: str, model_id: str) -> Instance:
    iid = InstanceId(instance_id)
    shard = ShardAssignment(
        node_id=A,
        runner_id=runner_id_for(iid, 0),
        rank=0,
        world_size=1,
        layer_start=0,
        layer_end=2,
        tp_rank=0,
        tp_size=1,
        device="cpu",
        weight_bytes=1,
        kv_cache_bytes=1,
    )
    return Instance(
        instance_id=iid,
        card=card(model_id),
        sharding="pipeline",
        backend="gloo",
        shards=(shard,),
        rendezvous=GroupAddress(host="127.0.0.1", port=29500),
    )


def state_of(*instances: tuple[Instance, RunnerStatus | None]) -> State:
    profile = NodeProfile(
        node_id=A,
        hostname="h",
        memory_total_bytes=1,
        memory_available_bytes=1,
        cpu_model="c",
        num_cpu_cores=1,
        num_cpu_threads=1,
        disk_free_bytes=1,
        api_address=ApiAddress(host="127.0.0.1", port=1),
        shoal_version="0",
        started_at=0.0,
    )
    events: list[Event] = [MasterElected(node_id=A, term=Term(1)), NodeJoined(node_id=A, profile=profile)]
    for item, status in instances:
        events.append(InstanceCreated(instance=item))
        if status is not None:
            shard = item.shards[0]
            events.append(
                RunnerStatusChanged(
                    runner_id=shard.runner_id, instance_id=item.instance_id, node_id=A, status=status
                )
            )
    return apply_all(
        State(),
        [IndexedEvent(index=i, term=Term(1), timestamp=0.0, event=e) for i, e in enumerate(events, 1)],
    )


def test_only_serving_instances_of_the_model_are_picked() -> None:
    state = state_of(
        (instance("i1", "m"), RunnerLoading(layers_done=1, layers_total=2)),
        (instance("i2", "m"), RunnerRunning(num_tasks=3)),
        (instance("i3", "other"), RunnerReady()),
    )
    picked = pick_instance(state, "m", {})
    assert isinstance(picked, Instance) and picked.instance_id == "i2"
    by_source = pick_instance(state, "/models/m", {})
    assert isinstance(by_source, Instance) and by_source.instance_id == "i2"


def test_fewest_in_flight_first_then_id() -> None:
    state = state_of((instance("i1", "m"), RunnerReady()), (instance("i2", "m"), RunnerReady()))
    assert pick_instance(state, "m", {}).instance_id == "i1"  # type: ignore[union-attr]
    assert pick_instance(state, "m", {InstanceId("i1"): 2, InstanceId("i2"): 1}).instance_id == "i2"  # type: ignore[union-attr]


def test_loading_instance_is_a_retry_and_none_is_unknown() -> None:
    loading = pick_instance(state_of((instance("i1", "m"), None)), "m", {})
    assert isinstance(loading, NoInstance) and loading.loading
    failed = pick_instance(state_of((instance("i1", "m"), RunnerFailed(reason="x"))), "m", {})
    assert isinstance(failed, NoInstance) and not failed.loading
    none = pick_instance(state_of(), "m", {})
    assert isinstance(none, NoInstance) and not none.loading and "no instance" in none.reason


def test_default_names_the_embedded_model() -> None:
    state = state_of((instance("i1", "SmolLM2-135M-Instruct"), RunnerReady()))
    assert isinstance(pick_instance(state, "default", {}), Instance)
    assert isinstance(pick_instance(state, "m", {}), NoInstance)


def test_a_pinned_instance_is_the_only_candidate() -> None:
    state = state_of((instance("i1", "m"), RunnerReady()), (instance("i2", "m"), RunnerReady()))
    pinned = pick_instance(state, "m", {}, InstanceId("i2"))
    assert isinstance(pinned, Instance) and pinned.instance_id == "i2"
    wrong_model = pick_instance(state, "other", {}, InstanceId("i2"))
    assert isinstance(wrong_model, NoInstance) and "no instance i2" in wrong_model.reason


def test_a_name_that_is_no_usable_path_matches_nothing() -> None:
    state = state_of((instance("i1", "m"), RunnerReady()))
    for name in ("m\x00", "\udcff", "~nobody-such-user/m"):
        picked = pick_instance(state, name, {})
        assert isinstance(picked, NoInstance) and not picked.loading

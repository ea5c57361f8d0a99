"""The master's decide() on instance commands against a folded State, and node timeouts deleting instances."""

from __future__ import annotations

from cluster_data import state_with_nodes

from shoal.master.commands import Rejection, decide
from shoal.master.instance_commands import instances_lost_with_node
from shoal.state import apply_all
from shoal.types import Event, IndexedEvent, NodeId, State
from shoal.types.instance_ids import InstanceId
from shoal.types.instance_messages import (
    InstanceDeleted,
    PlaceInstance,
    ReportRunnerStatus,
    RunnerStatusChanged,
)
from shoal.types.instances import ModelCard, PlacementRequest
from shoal.types.runners import RunnerFailed, RunnerReady

CARD = ModelCard(
    model_id="tiny",
    source="/models/tiny",
    architecture="LlamaForCausalLM",
    dtype="float32",
    num_layers=4,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    vocab_size=256,
    context_length=256,
    tie_word_embeddings=False,
    layer_bytes=200_000,
    embedding_bytes=65_536,
    head_bytes=65_792,
)


def fold(state: State, events: list[Event]) -> State:
    indexed = [
        IndexedEvent(index=state.last_index + i, term=state.term, timestamp=0.0, event=event)
        for i, event in enumerate(events, start=1)
    ]
    return apply_all(state, indexed)


def placed(state: State, **request: object) -> State:
    command = PlaceInstance(
        model=CARD, request=PlacementRequest.model_validate({"model_id": "tiny", **request})
    )
    events = decide(state, command, instance_id=InstanceId("i1"))
    assert not isinstance(events, Rejection), events
    return fold(state, events)


def test_place_creates_an_instance_in_the_state() -> None:
    state = placed(state_with_nodes("a", "b"), sharding="pipeline", min_nodes=2)
    instance = state.instances[InstanceId("i1")]
    assert instance.node_ids in ((NodeId("a"), NodeId("b")), (NodeId("b"), NodeId("a")))
    assert state.runners == {}


def test_impossible_place_is_rejected_with_the_placement_reason() -> None:
    state = state_with_nodes("a")
    command = PlaceInstance(model=CARD, request=PlacementRequest(model_id="tiny", backend="nccl"))
    result = decide(state, command, instance_id=InstanceId("i1"))
    assert isinstance(result, Rejection) and "nccl" in result.reason


def test_failed_runner_report_deletes_the_instance_and_its_runners() -> None:
    state = placed(state_with_nodes("a", "b"), sharding="pipeline", min_nodes=2)
    instance = state.instances[InstanceId("i1")]
    first, second = instance.shards
    ready = ReportRunnerStatus(
        runner_id=first.runner_id,
        instance_id=instance.instance_id,
        node_id=first.node_id,
        status=RunnerReady(),
    )
    events = decide(state, ready)
    assert isinstance(events, list) and [type(e) for e in events] == [RunnerStatusChanged]
    state = fold(state, events)
    assert decide(state, ready) == []  # the same status again writes nothing
    failed = ready.model_copy(
        update={
            "runner_id": second.runner_id,
            "node_id": second.node_id,
            "status": RunnerFailed(reason="boom"),
        }
    )
    events = decide(state, failed)
    assert isinstance(events, list) and [type(e) for e in events] == [RunnerStatusChanged, InstanceDeleted]
    state = fold(state, events)
    assert state.instances == {} and state.runners == {}


def test_node_timeout_deletes_only_the_instances_on_that_node() -> None:
    state = placed(state_with_nodes("a", "b"), node_ids=("a",))
    assert instances_lost_with_node(state.instances, NodeId("b")) == []
    [deleted] = instances_lost_with_node(state.instances, NodeId("a"))
    assert deleted.instance_id == "i1" and "timed out" in deleted.reason

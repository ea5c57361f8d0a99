"""The instance part of the reducer: create, status, delete, and the invalid histories it refuses."""

from __future__ import annotations

import pytest

from shoal.instance_state import apply_instance_event
from shoal.state import InvalidEventError
from shoal.types.ids import NodeId
from shoal.types.instance_ids import InstanceId, RunnerId, runner_id_for
from shoal.types.instance_messages import InstanceCreated, InstanceDeleted, RunnerStatusChanged
from shoal.types.instances import GroupAddress, Instance, ModelCard, ShardAssignment
from shoal.types.runners import RunnerFailed, RunnerReady

IID = InstanceId("i1")
CARD = ModelCard(
    model_id="m",
    source="/m",
    architecture="LlamaForCausalLM",
    dtype="bfloat16",
    num_layers=2,
    hidden_size=8,
    intermediate_size=16,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    vocab_size=10,
    context_length=16,
    tie_word_embeddings=True,
    layer_bytes=1,
    embedding_bytes=1,
    head_bytes=1,
)
INSTANCE = Instance(
    instance_id=IID,
    card=CARD,
    sharding="pipeline",
    backend="gloo",
    shards=tuple(
        ShardAssignment(
            node_id=NodeId(node),
            runner_id=runner_id_for(IID, rank),
            rank=rank,
            world_size=2,
            layer_start=rank,
            layer_end=rank + 1,
            tp_rank=0,
            tp_size=1,
            device="cpu",
            weight_bytes=1,
            kv_cache_bytes=1,
        )
        for rank, node in enumerate(("a", "b"))
    ),
    rendezvous=GroupAddress(host="127.0.0.1", port=29500),
)
R0, R1 = runner_id_for(IID, 0), runner_id_for(IID, 1)


def status(runner_id: RunnerId, node: str, failed: bool = False) -> RunnerStatusChanged:
    value = RunnerFailed(reason="boom") if failed else RunnerReady()
    return RunnerStatusChanged(runner_id=runner_id, instance_id=IID, node_id=NodeId(node), status=value)


def test_create_report_delete_leaves_nothing_behind() -> None:
    instances, runners = apply_instance_event({}, {}, InstanceCreated(instance=INSTANCE))
    assert instances == {IID: INSTANCE} and runners == {}
    instances, runners = apply_instance_event(instances, runners, status(R0, "a"))
    instances, runners = apply_instance_event(instances, runners, status(R1, "b", failed=True))
    assert runners == {R0: RunnerReady(), R1: RunnerFailed(reason="boom")}
    before = (dict(instances), dict(runners))
    instances2, runners2 = apply_instance_event(
        instances, runners, InstanceDeleted(instance_id=IID, reason="x")
    )
    assert instances2 == {} and runners2 == {}
    assert (instances, runners) == before  # inputs are never mutated


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ([InstanceCreated(instance=INSTANCE), InstanceCreated(instance=INSTANCE)], "created twice"),
        ([InstanceDeleted(instance_id=IID, reason="x")], "does not exist"),
        ([status(R0, "a")], "unknown instance"),
        ([InstanceCreated(instance=INSTANCE), status(R0, "b")], "is not a runner of instance"),
        ([InstanceCreated(instance=INSTANCE), status(RunnerId("i1-r7"), "a")], "is not a runner of instance"),
    ],
)
def test_invalid_histories_are_refused(history: list[object], message: str) -> None:
    instances: dict[InstanceId, Instance] = {}
    runners: dict[RunnerId, object] = {}
    with pytest.raises(InvalidEventError, match=message):
        for event in history:
            instances, runners = apply_instance_event(instances, runners, event)  # type: ignore[arg-type]

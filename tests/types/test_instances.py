"""Instance, runner and instance-message types: unique kinds, JSON round trips, and the invariants their
validators enforce."""

from __future__ import annotations

import typing
from typing import Annotated, Any

import pytest
from instance_examples import CARD, IID, INSTANCE, MESSAGE_EXAMPLES, REQUEST, instance, shard
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from test_unions import UNIONS, kind_of, members
from type_examples import NODE_A, NODE_B

from shoal.types.instance_ids import InstanceId, RunnerId, new_instance_id, new_task_id, runner_id_for
from shoal.types.instance_messages import (
    INSTANCE_COMMANDS,
    INSTANCE_EVENTS,
    DeleteInstance,
    PlaceInstance,
)
from shoal.types.instances import (
    NodeMemoryUse,
    PlacementPreview,
    PlacementRequest,
)
from shoal.types.runners import (
    RUNNER_STATUS_ADAPTER,
    RunnerConnected,
    RunnerConnecting,
    RunnerFailed,
    RunnerIdle,
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerShutdown,
    RunnerShuttingDown,
    RunnerStatus,
    RunnerWarmingUp,
    is_serving,
    is_starting,
    is_terminal,
)

STATUS_EXAMPLES: dict[type[BaseModel], BaseModel] = {
    RunnerIdle: RunnerIdle(),
    RunnerConnecting: RunnerConnecting(),
    RunnerConnected: RunnerConnected(),
    RunnerLoading: RunnerLoading(layers_done=3, layers_total=18),
    RunnerLoaded: RunnerLoaded(),
    RunnerWarmingUp: RunnerWarmingUp(),
    RunnerReady: RunnerReady(),
    RunnerRunning: RunnerRunning(num_tasks=4),
    RunnerShuttingDown: RunnerShuttingDown(),
    RunnerShutdown: RunnerShutdown(),
    RunnerFailed: RunnerFailed(reason="exited with signal 9 (SIGKILL)"),
}


def union_of(classes: tuple[type[BaseModel], ...]) -> TypeAdapter[Any]:
    """The union these classes will form inside Command / Event (same declaration style)."""
    return TypeAdapter(Annotated[typing.Union[classes], Field(discriminator="kind")])  # noqa: UP007


def status_members() -> tuple[type[BaseModel], ...]:
    return typing.get_args(typing.get_args(RunnerStatus)[0])


def test_runner_status_union_members_are_unique_and_have_examples() -> None:
    classes = status_members()
    assert len(classes) == 11 and set(classes) == set(STATUS_EXAMPLES)
    assert len({kind_of(cls) for cls in classes}) == len(classes)


@pytest.mark.parametrize("cls", list(STATUS_EXAMPLES))
def test_runner_status_round_trips_through_json(cls: type[BaseModel]) -> None:
    example = STATUS_EXAMPLES[cls]
    decoded = RUNNER_STATUS_ADAPTER.validate_json(RUNNER_STATUS_ADAPTER.dump_json(example))  # type: ignore[arg-type]
    assert type(decoded) is cls and decoded == example


@pytest.mark.parametrize("cls", list(MESSAGE_EXAMPLES))
def test_instance_message_round_trips_through_json(cls: type[BaseModel]) -> None:
    family = INSTANCE_COMMANDS if cls in INSTANCE_COMMANDS else INSTANCE_EVENTS
    adapter = union_of(family)
    example = MESSAGE_EXAMPLES[cls]
    payload = adapter.dump_json(example)
    decoded = adapter.validate_json(payload)
    assert type(decoded) is cls and decoded == example
    assert adapter.dump_json(decoded) == payload
    assert cls.model_validate_json(example.model_dump_json()) == example


def test_every_instance_message_has_an_example() -> None:
    assert set(MESSAGE_EXAMPLES) == set(INSTANCE_COMMANDS) | set(INSTANCE_EVENTS)
    assert not set(INSTANCE_COMMANDS) & set(INSTANCE_EVENTS)


def test_runner_status_kinds_never_collide_with_union_members() -> None:
    """A status travels inside commands and events; its kind must never make a payload ambiguous."""
    kinds = {kind_of(cls) for name in UNIONS for cls in members(name)}
    for cls in status_members():
        assert kind_of(cls) not in kinds, f"{cls.__name__} reuses kind {kind_of(cls)!r}"
    for cls in (*INSTANCE_COMMANDS, *INSTANCE_EVENTS):
        assert cls in members("Command") or cls in members("Event")


def test_status_predicates() -> None:
    terminal = {cls for cls, example in STATUS_EXAMPLES.items() if is_terminal(example)}  # type: ignore[arg-type]
    serving = {cls for cls, example in STATUS_EXAMPLES.items() if is_serving(example)}  # type: ignore[arg-type]
    assert terminal == {RunnerShutdown, RunnerFailed}
    assert serving == {RunnerReady, RunnerRunning}
    starting = {cls for cls, example in STATUS_EXAMPLES.items() if is_starting(example)}  # type: ignore[arg-type]
    assert starting == {
        RunnerIdle,
        RunnerConnecting,
        RunnerConnected,
        RunnerLoading,
        RunnerLoaded,
        RunnerWarmingUp,
    }


def test_loading_progress_cannot_exceed_its_total() -> None:
    with pytest.raises(ValidationError, match="exceeds layers_total"):
        RunnerLoading(layers_done=5, layers_total=4)


def test_ids() -> None:
    assert runner_id_for(IID, 3) == RunnerId(f"{IID}-r3")
    assert new_instance_id() != new_instance_id()
    assert len(new_task_id()) == 32
    with pytest.raises(ValueError):
        runner_id_for(IID, -1)
    with pytest.raises(ValidationError):
        DeleteInstance(instance_id=InstanceId("shoal/*"))


def test_instance_helpers() -> None:
    assert INSTANCE.node_ids == (NODE_A, NODE_B)
    assert INSTANCE.runner_ids == (runner_id_for(IID, 0), runner_id_for(IID, 1))
    assert INSTANCE.shard_on(NODE_B) == INSTANCE.shards[1]
    assert INSTANCE.shard_on("nobody") is None  # type: ignore[arg-type]
    assert CARD.kv_bytes_per_token == 30 * 2 * 3 * 64 * 2
    assert CARD.weight_bytes == 56_623_104 + 30 * 7_000_000 + 56_624_256 - 56_623_104


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shards": ()}, "at least one shard"),
        ({"shards": (shard(1, NODE_A, 0, 18), shard(0, NODE_B, 18, 30))}, "must be ranks 0..1"),
        ({"shards": (shard(0, NODE_A, 0, 18), shard(1, NODE_A, 18, 30))}, "one shard per node"),
        ({"shards": (shard(0, NODE_A, 0, 18), shard(1, NODE_B, 17, 30))}, "must start at layer 18"),
        ({"shards": (shard(0, NODE_A, 0, 18), shard(1, NODE_B, 18, 29))}, "end at layer 29"),
        ({"backend": "nccl"}, "CUDA device"),
        ({"sharding": "tensor"}, "must hold layers"),
        ({"shards": (shard(0, NODE_A, 0, 18, world=1), shard(1, NODE_B, 18, 30))}, "must be ranks"),
    ],
)
def test_instance_rejects_inconsistent_shards(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        instance(**changes)


def test_tensor_instance_is_valid_when_every_rank_holds_every_layer() -> None:
    shards = tuple(
        shard(r, n, 0, 30, tp_rank=r, tp_size=2, device=f"cuda:{r}") for r, n in enumerate((NODE_A, NODE_B))
    )
    tensor = instance(sharding="tensor", backend="nccl", shards=shards)
    assert [s.tp_rank for s in tensor.shards] == [0, 1]


@pytest.mark.parametrize(
    "changes",
    [
        {"weight_bytes": -1},
        {"tp_rank": 1},
        {"layer_start": 18, "layer_end": 18},
        {"device": "gpu0"},
        {"runner_id": "a/b"},
    ],
)
def test_shard_assignment_rejects_bad_fields(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        shard(0, NODE_A, 0, 18, **changes)


def test_shard_rank_must_be_inside_its_world() -> None:
    with pytest.raises(ValidationError, match="outside a world of size 2"):
        shard(2, NODE_A, 0, 18, world=2)


def test_placement_request_checks() -> None:
    assert PlacementRequest(model_id="m").sharding == "auto"
    with pytest.raises(ValidationError, match="twice"):
        PlacementRequest(model_id="m", node_ids=(NODE_A, NODE_A))
    with pytest.raises(ValidationError, match="at least one node"):
        PlacementRequest(model_id="m", node_ids=())
    with pytest.raises(ValidationError):
        PlacementRequest(model_id="m", sharding="ring")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        PlacementRequest(model_id="m", min_nodes=0)
    with pytest.raises(ValidationError, match="card is for"):
        PlaceInstance(model=CARD, request=PlacementRequest(model_id="other"))


def test_preview_totals() -> None:
    use = NodeMemoryUse(
        node_id=NODE_A,
        device="cpu",
        rank=0,
        layer_start=0,
        layer_end=30,
        tp_size=1,
        weight_bytes=10,
        kv_cache_bytes=5,
        overhead_bytes=1,
        free_bytes=100,
    )
    preview = PlacementPreview(request=REQUEST, sharding="pipeline", backend="gloo", memory=(use,))
    assert preview.total_bytes == 16 and preview.node_ids == (NODE_A,)
    assert PlacementPreview.model_validate_json(preview.model_dump_json()) == preview

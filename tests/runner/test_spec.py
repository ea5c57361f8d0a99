"""RunnerSpec from a placed instance, and the test-only fault setting (pure, no processes)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shoal.runner.spec import STALL_STAGE_ENV, RunnerFaults, RunnerSpec
from shoal.types.ids import NodeId
from shoal.types.instance_ids import InstanceId, runner_id_for
from shoal.types.instances import GroupAddress, Instance, ModelCard, ShardAssignment

IID = InstanceId("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
CARD = ModelCard(
    model_id="tiny",
    source="/models/tiny",
    architecture="LlamaForCausalLM",
    dtype="float32",
    num_layers=3,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    vocab_size=256,
    context_length=256,
    tie_word_embeddings=False,
    layer_bytes=1000,
    embedding_bytes=1000,
    head_bytes=1000,
)


def make_instance(sharding: str) -> Instance:
    shards = []
    for rank, (start, end) in enumerate([(0, 1), (1, 3)] if sharding == "pipeline" else [(0, 3), (0, 3)]):
        shards.append(
            ShardAssignment(
                node_id=NodeId(f"node{rank}"),
                runner_id=runner_id_for(IID, rank),
                rank=rank,
                world_size=2,
                layer_start=start,
                layer_end=end,
                tp_rank=rank if sharding == "tensor" else 0,
                tp_size=2 if sharding == "tensor" else 1,
                device="cpu",
                weight_bytes=1000,
                kv_cache_bytes=5000,
            )
        )
    return Instance.model_validate(
        {
            "instance_id": IID,
            "card": CARD,
            "sharding": sharding,
            "backend": "gloo",
            "shards": tuple(shards),
            "rendezvous": GroupAddress(host="10.0.0.1", port=29500),
        }
    )


@pytest.mark.parametrize(("sharding", "sampling_rank"), [("pipeline", 1), ("tensor", 0)])
def test_spec_for_each_shard_of_an_instance(sharding: str, sampling_rank: int) -> None:
    instance = make_instance(sharding)
    specs = [
        RunnerSpec.for_shard(instance, shard, "/models/tiny", num_threads=2, group_timeout_s=30.0)
        for shard in instance.shards
    ]
    for rank, spec in enumerate(specs):
        shard = instance.shards[rank]
        assert (spec.rank, spec.world_size, spec.runner_id) == (rank, 2, shard.runner_id)
        assert (spec.layer_start, spec.layer_end, spec.tp_rank, spec.tp_size) == (
            shard.layer_start,
            shard.layer_end,
            shard.tp_rank,
            shard.tp_size,
        )
        assert spec.rendezvous == instance.rendezvous and spec.quant == instance.quant
        assert spec.kv_cache_bytes == 5000 and spec.num_threads == 2 and spec.group_timeout_s == 30.0
        assert spec.sampling_rank == sampling_rank
        assert spec.is_sampling_rank == (rank == sampling_rank)
        assert RunnerSpec.model_validate_json(spec.model_dump_json()) == spec


def test_quantized_shards_compute_in_bfloat16_and_plain_ones_in_the_model_dtype() -> None:
    plain = make_instance("pipeline")
    assert plain.quant == "none" and plain.card.dtype == "float32"
    assert RunnerSpec.for_shard(plain, plain.shards[0], "/models/tiny").dtype == "float32"
    for quant in ("int8", "int4", "auto"):
        quantized = plain.model_copy(update={"quant": quant})
        assert RunnerSpec.for_shard(quantized, quantized.shards[0], "/models/tiny").dtype == "bfloat16"


def test_spec_rejects_unknown_settings_and_bad_limits() -> None:
    instance = make_instance("pipeline")
    with pytest.raises(ValidationError, match="extra"):
        RunnerSpec.for_shard(instance, instance.shards[0], "/m", unknown_setting=1)
    with pytest.raises(ValidationError, match="group_timeout_s"):
        RunnerSpec.for_shard(instance, instance.shards[0], "/m", group_timeout_s=0.0)


def test_faults_come_only_from_the_named_variable() -> None:
    assert RunnerFaults.from_environ({}) == RunnerFaults()
    assert RunnerFaults.from_environ({STALL_STAGE_ENV: "loading"}).stall_stage == "loading"
    assert RunnerFaults.from_environ({"OTHER": "loading"}).stall_stage is None
    with pytest.raises(ValueError, match="not one of connecting, loading, warming_up"):
        RunnerFaults.from_environ({STALL_STAGE_ENV: "everywhere"})

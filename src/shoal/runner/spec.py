"""What one runner process is told to be: its shard of an instance, its model, and its limits.

`RunnerSpec` is frozen configuration built at the edge (the node's worker, from an `Instance` and the
`ShardAssignment` for this node) and handed to the runner process as its first message. `RunnerFaults`
is test-only fault injection, read from the runner process's environment by its entry point alone
(never from request content), so production input can never reach it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from shoal.types._base import FrozenModel
from shoal.types.instance_ids import InstanceIdField, RunnerIdField
from shoal.types.instances import (
    CommBackend,
    Device,
    GroupAddress,
    Instance,
    ModelDtype,
    ShardAssignment,
    Sharding,
    WeightQuant,
)

Seconds = Annotated[float, Field(gt=0)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]

STALL_STAGE_ENV = "SHOAL_TEST_STALL_STAGE"
StallStage = Literal["connecting", "loading", "warming_up"]
_STALL_STAGES: tuple[StallStage, ...] = ("connecting", "loading", "warming_up")


class RunnerSpec(FrozenModel):
    """One shard of one instance, as its runner process needs it.

    Rank `rank` of `world_size` in the instance's `torch.distributed` group, which rank 0 hosts at
    `rendezvous`. `quant` is applied to the shard's weights after loading. `group_timeout_s` bounds the group start (a missing peer fails the runner after it) and
    every collective afterwards (a hung peer fails it too); rank 0 keeps an idle group alive with a
    heartbeat every `heartbeat_s`, which must be well under `group_timeout_s`.
    """

    runner_id: RunnerIdField
    instance_id: InstanceIdField
    sharding: Sharding
    backend: CommBackend
    rank: NonNegative
    world_size: Positive
    layer_start: NonNegative
    layer_end: Positive
    tp_rank: NonNegative
    tp_size: Positive
    device: Device
    rendezvous: GroupAddress
    model_path: Annotated[str, Field(min_length=1)]
    dtype: ModelDtype = "bfloat16"
    quant: WeightQuant = "none"
    kv_cache_bytes: Positive = 256 << 20
    block_size: Positive = 16
    max_num_batched_tokens: Positive = 1024
    max_num_seqs: Positive = 64
    max_model_len: Positive | None = None
    tokenizer_cache_dir: str | None = None
    num_threads: Positive | None = None
    # One-stream decode steps through torch.compile'd layers (`LlamaForCausalLM.compile_decode`): CPU and
    # pipeline or single shards only (compiled layers would break at every tensor-parallel all-reduce).
    compile_decode: bool = False
    # CPU cores the runner's compute threads run on (None: any). Applied once the group has started, so
    # gloo's I/O threads (started with the group) may run on any core: pinned to the compute core they
    # compete with it and every all-reduce waits for them (2.2 ms instead of 1.5 ms on the dev box).
    cpu_affinity: tuple[NonNegative, ...] | None = Field(default=None, min_length=1)
    group_timeout_s: Seconds = 120.0
    heartbeat_s: Seconds = 0.5

    @property
    def sampling_rank(self) -> int:
        """The rank that holds logits and samples: the last pipeline stage, or tensor rank 0."""
        return self.world_size - 1 if self.sharding == "pipeline" else 0

    @property
    def is_sampling_rank(self) -> bool:
        return self.rank == self.sampling_rank

    @classmethod
    def for_shard(
        cls, instance: Instance, shard: ShardAssignment, model_path: str, **settings: object
    ) -> RunnerSpec:
        """The spec of `shard` of `instance`; `settings` are the node-local fields (cache, threads, limits)."""
        return cls.model_validate(
            {
                "runner_id": shard.runner_id,
                "instance_id": instance.instance_id,
                "sharding": instance.sharding,
                "backend": instance.backend,
                "rank": shard.rank,
                "world_size": shard.world_size,
                "layer_start": shard.layer_start,
                "layer_end": shard.layer_end,
                "tp_rank": shard.tp_rank,
                "tp_size": shard.tp_size,
                "device": shard.device,
                "rendezvous": instance.rendezvous,
                "model_path": model_path,
                "dtype": compute_dtype(instance.card.dtype, instance.quant),
                "quant": instance.quant,
                "kv_cache_bytes": max(1, shard.kv_cache_bytes),
                **settings,
            },
            strict=False,
        )


def compute_dtype(model_dtype: str, quant: str) -> str:
    """Quantized weights compute in bfloat16 (their kernels do, and `shoal generate` does the same, so a
    node answers like the CLI); unquantized ones in the model's own dtype."""
    return model_dtype if quant == "none" else "bfloat16"


@dataclass(frozen=True, slots=True)
class RunnerFaults:
    """Test-only faults. `stall_stage`: on entering that stage the runner hangs (to test deadlines)."""

    stall_stage: StallStage | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> RunnerFaults:
        value = environ.get(STALL_STAGE_ENV)
        if not value:
            return cls()
        for stage in _STALL_STAGES:
            if stage == value:
                return cls(stall_stage=stage)
        raise ValueError(f"{STALL_STAGE_ENV}={value!r} is not one of {', '.join(_STALL_STAGES)}")

"""How a model is split across ranks, and how ranks talk while running it.

`ShardSpec` says which slice of the model one process holds: a tensor-parallel rank (heads and MLP columns
split `tp_size` ways) and a pipeline stage (layers [layer_start, layer_end)). `Communicator` is the one
collective the model code needs: an in-place sum across the tensor-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from shoal.engine.config import ModelConfig


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One rank's slice. `layer_end=None` means "up to the last layer"."""

    tp_rank: int = 0
    tp_size: int = 1
    layer_start: int = 0
    layer_end: int | None = None

    def resolve(self, config: ModelConfig) -> ShardSpec:
        """Check this shard against the model and fill in `layer_end`; ValueError naming the problem."""
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tensor-parallel rank {self.tp_rank} is outside a group of size {self.tp_size}")
        if config.num_heads % self.tp_size or config.num_kv_heads % self.tp_size:
            raise ValueError(
                f"tensor-parallel size {self.tp_size} must divide the attention heads ({config.num_heads}) "
                f"and the key/value heads ({config.num_kv_heads})"
            )
        end = config.num_layers if self.layer_end is None else self.layer_end
        if not 0 <= self.layer_start < end <= config.num_layers:
            raise ValueError(
                f"layer range [{self.layer_start}, {end}) is not a non-empty range inside the model's "
                f"{config.num_layers} layers"
            )
        return ShardSpec(self.tp_rank, self.tp_size, self.layer_start, end)

    @property
    def is_first_stage(self) -> bool:
        return self.layer_start == 0

    def is_last_stage(self, num_layers: int) -> bool:
        return self.layer_end is None or self.layer_end == num_layers

    def owns_layer(self, index: int) -> bool:
        return self.layer_start <= index and (self.layer_end is None or index < self.layer_end)


class Communicator(Protocol):
    """Collectives across one tensor-parallel group."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the group in place and return it."""
        ...


class SingleProcessCommunicator:
    """The group of one: every collective is the identity."""

    rank = 0
    world_size = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class TorchDistributedCommunicator:
    """A `torch.distributed` process group (gloo on CPU, NCCL between GPUs)."""

    def __init__(self, group: object | None = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
        self._dist = dist
        self._group = group
        self._rank = dist.get_rank(group)  # type: ignore[arg-type]
        self._world_size = dist.get_world_size(group)  # type: ignore[arg-type]

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(tensor, group=self._group)
        return tensor

"""Linear layers that hold one tensor-parallel rank's shard of a weight.

Every layer keeps only its local shard: `weight_loader(param, full_tensor, shard_id)` cuts the checkpoint
tensor (full, [out_features, in_features] as stored by Hugging Face) to this rank's slice and copies it in.

Quantization hook (the contract `shoal.engine.quant` codes against):
    `LinearBase.weight` is the local shard, [out_features_local, in_features_local]; `.bias` is the local
    bias or None. The product goes through `self.apply_weight(x)`, which is `F.linear(x, self.weight)`
    until `layer.set_weight_kernel(kernel)` is called with a callable `kernel(x) -> x @ W.T` that holds its
    own (packed) copy of W. After that call the layer no longer reads `.weight`, which is dropped (set to
    None) so its memory can be freed. The bias, the tensor-parallel all-reduce and everything else stay in
    the layer, so a kernel only ever implements the bare matrix product on the local shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shoal.engine.parallel import Communicator, SingleProcessCommunicator

WeightKernel = Callable[[torch.Tensor], torch.Tensor]


def _param(shape: Sequence[int], dtype: torch.dtype, loader: Callable[..., None]) -> nn.Parameter:
    param = nn.Parameter(torch.empty(tuple(shape), dtype=dtype), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


class LinearBase(nn.Module):
    """y = x @ W.T (+ b) on this rank's shard; see the module docstring for the quantization hook."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        self.in_features = in_features  # local
        self.out_features = out_features  # local
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.weight = _param((out_features, in_features), dtype, self.weight_loader)
        self.bias = _param((out_features,), dtype, self.weight_loader) if bias else None
        self._kernel: WeightKernel | None = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        """Copy the whole checkpoint tensor (no sharding); subclasses cut their slice."""
        _copy_checked(param.data, loaded, self)

    def set_weight_kernel(self, kernel: WeightKernel) -> None:
        """Route the matrix product through `kernel` (which owns its weight) and drop `.weight`."""
        self._kernel = kernel
        self.weight = None

    def apply_weight(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None:
            return self._kernel(x)
        assert self.weight is not None
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply_weight(x)
        return y if self.bias is None else y + self.bias


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank."""


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank's output is its slice of y (no communication)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        _check_divisible(out_features, tp_size, "output features")
        super().__init__(in_features, out_features // tp_size, bias, dtype, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        size = param.shape[0]
        _copy_checked(param.data, loaded.narrow(0, self.tp_rank * size, size), self)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (e.g. gate and up); shard ids are 0, 1, ... as str."""

    def __init__(
        self,
        in_features: int,
        output_sizes: Sequence[int],
        bias: bool,
        dtype: torch.dtype,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        for size in output_sizes:
            _check_divisible(size, tp_size, "output features")
        self.output_sizes = tuple(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, dtype, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        index = int(shard_id or 0)
        size = self.output_sizes[index] // self.tp_size
        offset = sum(self.output_sizes[:index]) // self.tp_size
        local = loaded.narrow(0, self.tp_rank * size, size)
        _copy_checked(param.data.narrow(0, offset, size), local, self)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projections; each rank holds its heads of each (shard ids "q", "k", "v")."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        dtype: torch.dtype,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        _check_divisible(num_heads, tp_size, "attention heads")
        _check_divisible(num_kv_heads, tp_size, "key/value heads")
        self.q_size = num_heads // tp_size * head_dim  # local
        self.kv_size = num_kv_heads // tp_size * head_dim  # local
        out = (num_heads + 2 * num_kv_heads) * head_dim
        super().__init__(hidden_size, out, bias, dtype, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        size, offset = {
            "q": (self.q_size, 0),
            "k": (self.kv_size, self.q_size),
            "v": (self.kv_size, self.q_size + self.kv_size),
        }[shard_id or "q"]
        local = loaded.narrow(0, self.tp_rank * size, size)
        _copy_checked(param.data.narrow(0, offset, size), local, self)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products are summed by one all-reduce, then the bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        tp_rank: int = 0,
        tp_size: int = 1,
        comm: Communicator | None = None,
    ) -> None:
        _check_divisible(in_features, tp_size, "input features")
        super().__init__(in_features // tp_size, out_features, bias, dtype, tp_rank, tp_size)
        self.comm: Communicator = comm or SingleProcessCommunicator()

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if param.dim() == 1:  # bias: whole on every rank, added once after the reduction
            _copy_checked(param.data, loaded, self)
            return
        size = param.shape[1]
        _copy_checked(param.data, loaded.narrow(1, self.tp_rank * size, size), self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply_weight(x)
        if self.tp_size > 1:
            y = self.comm.all_reduce(y)
        return y if self.bias is None else y + self.bias


def _check_divisible(value: int, tp_size: int, what: str) -> None:
    if value % tp_size:
        raise ValueError(f"tensor-parallel size {tp_size} does not divide the {value} {what}")


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, layer: nn.Module) -> None:
    if dst.shape != src.shape:
        raise ValueError(
            f"{type(layer).__name__}: checkpoint tensor of shape {tuple(src.shape)} does not fit "
            f"{tuple(dst.shape)}"
        )
    dst.copy_(src)

"""The instance's `torch.distributed` group as one runner sees it: a strict start, then the few
collectives a distributed engine step needs.

Start is strict: every rank announces (instance, sharding, world size) under its rank in rank 0's store,
then checks that ranks 0..world_size-1 all announced exactly the same, and that no rank joined twice.
A missing peer, a wrong world size, a duplicate rank or another instance's runner on the port fails the
start with a `GroupStartError` naming it, within `group_timeout_s`; nothing ever runs as a smaller group.

Per step (see `serve.py`): `exchange` (rank 0's input delta plus everyone's stop wish), `send_hidden` /
`recv_hidden` between pipeline stages, and `broadcast_tokens` from the sampling rank.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from shoal.runner.spec import RunnerSpec


class GroupStartError(RuntimeError):
    """The group could not start as the instance describes it."""


def start_group(spec: RunnerSpec) -> None:
    """Join the instance's group (no-op for a single-shard instance); GroupStartError naming the problem."""
    if spec.world_size == 1:
        return
    if spec.backend == "nccl":
        torch.cuda.set_device(torch.device(spec.device))
    timeout = timedelta(seconds=spec.group_timeout_s)
    host, port = spec.rendezvous.host, spec.rendezvous.port
    try:
        store = dist.TCPStore(
            host,
            port,
            world_size=spec.world_size,
            is_master=spec.rank == 0,
            timeout=timeout,
            wait_for_workers=False,
        )
    except Exception as exc:  # torch raises DistNetworkError / RuntimeError with long C++ traces
        where = "host the rendezvous" if spec.rank == 0 else "reach rank 0's rendezvous"
        raise GroupStartError(
            f"rank {spec.rank} could not {where} at {host}:{port} within {spec.group_timeout_s:g} s: "
            f"{_first_line(exc)}"
        ) from exc
    _check_peers(spec, store)
    try:
        dist.init_process_group(
            spec.backend,
            store=dist.PrefixStore("group", store),
            rank=spec.rank,
            world_size=spec.world_size,
            timeout=timeout,
        )
        dist.barrier()
    except Exception as exc:
        raise GroupStartError(
            f"rank {spec.rank} of {spec.world_size}: the {spec.backend} group did not form: {_first_line(exc)}"
        ) from exc


def _check_peers(spec: RunnerSpec, store: dist.Store) -> None:
    identity = f"{spec.instance_id}|{spec.sharding}|{spec.world_size}"
    where = f"{spec.rendezvous.host}:{spec.rendezvous.port}"
    try:
        if store.add(f"shoal/joined/{spec.rank}", 1) != 1:
            raise GroupStartError(f"rank {spec.rank} joined the group of instance {spec.instance_id} twice")
        store.set(f"shoal/identity/{spec.rank}", identity)
    except GroupStartError:
        raise
    except Exception as exc:
        raise GroupStartError(f"rank {spec.rank} lost the rendezvous at {where}: {_first_line(exc)}") from exc
    for rank in range(spec.world_size):
        key = f"shoal/identity/{rank}"
        try:
            store.wait([key], timedelta(seconds=spec.group_timeout_s))
            theirs = store.get(key).decode()
        except Exception as exc:
            raise GroupStartError(
                f"rank {rank} of {spec.world_size} did not join the group of instance {spec.instance_id} "
                f"within {spec.group_timeout_s:g} s (rank {spec.rank} waited for it at {where}): "
                f"{_first_line(exc)}"
            ) from exc
        if theirs != identity:
            their_instance, their_sharding, their_world = theirs.split("|")
            raise GroupStartError(
                f"rank {rank} joined as {their_sharding} instance {their_instance} with world size "
                f"{their_world}, but rank {spec.rank} expects {spec.sharding} instance {spec.instance_id} "
                f"with world size {spec.world_size}"
            )


def stop_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class StepChannel:
    """The collectives of one engine step. With a world of one, every call is local."""

    def __init__(self, spec: RunnerSpec) -> None:
        self.rank = spec.rank
        self.world_size = spec.world_size
        self.sampling_rank = spec.sampling_rank
        # NCCL moves only GPU tensors; gloo only CPU ones.
        self.device = torch.device(spec.device) if spec.backend == "nccl" else torch.device("cpu")

    def exchange(self, payload: bytes, stop: bool) -> tuple[bytes, bool]:
        """Rank 0's `payload` reaches every rank; True when any rank wished to stop."""
        if self.world_size == 1:
            return payload, stop
        own_length = len(payload) if self.rank == 0 else 0
        header = torch.tensor([own_length, int(stop)], dtype=torch.int64, device=self.device)
        dist.all_reduce(header)
        length, num_stops = (int(v) for v in header.tolist())
        if length == 0:
            return b"", num_stops > 0
        if self.rank == 0:
            buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        else:
            buffer = torch.empty(length, dtype=torch.uint8, device=self.device)
        dist.broadcast(buffer, src=0)
        return buffer.cpu().numpy().tobytes(), num_stops > 0

    def send_hidden(self, hidden: torch.Tensor) -> None:
        dist.send(hidden.contiguous().to(self.device), dst=self.rank + 1)

    def recv_hidden(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(buffer, src=self.rank - 1)
        return buffer

    def broadcast_tokens(self, token_ids: list[int] | None, count: int) -> list[int]:
        """The sampling rank passes its `count` sampled ids; every rank gets them back."""
        if self.world_size == 1:
            assert token_ids is not None
            return token_ids
        if self.rank == self.sampling_rank:
            assert token_ids is not None and len(token_ids) == count
            buffer = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        else:
            buffer = torch.empty(count, dtype=torch.int64, device=self.device)
        dist.broadcast(buffer, src=self.sampling_rank)
        return [int(t) for t in buffer.tolist()]

    def min_across_ranks(self, values: list[int]) -> list[int]:
        return self._reduce(values, dist.ReduceOp.MIN)

    def max_across_ranks(self, values: list[int]) -> list[int]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: list[int], op: dist.ReduceOp.RedOpType) -> list[int]:
        if self.world_size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return [int(v) for v in tensor.tolist()]

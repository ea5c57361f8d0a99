"""The instance's `torch.distributed` group as one runner sees it: a strict start, then the few
collectives a distributed engine step needs.

Start is strict: every rank announces (instance, sharding, world size) under its rank in rank 0's store,
then checks that ranks 0..world_size-1 all announced exactly the same, and that no rank joined twice.
A missing peer, a wrong world size, a duplicate rank or another instance's runner on the port fails the
start with a `GroupStartError` naming it, within `group_timeout_s`; nothing ever runs as a smaller group.

Per step (see `serve.py`), `begin_step` hands rank 0's input delta to every rank and `end_step` tells
each rank whether the group stops. Tensor parallel: one `exchange` at the start carries the delta, the
stop wishes and the sampled-token check (the ranks compute side by side, and all hold the full logits, so
each samples the same tokens itself). Pipeline: the step travels along the stages and never waits for a
later one: rank 0 sends the delta (with its stop wish) to rank 1, which adds its wish and forwards it,
and so on; `send_hidden` / `recv_hidden` carry the activations the same way; the sampling (last) rank
then sends every other rank the step's end, its sampled tokens plus the group's stop (`share_tokens`, or
`end_step` in a step that sampled nothing). So a stage's own bookkeeping (detokenizing, reporting) runs
while the next token is computed, and no rank idles at a barrier for a later stage.

A CPU (gloo) group also opens a socket mesh (mesh.py) that carries every per-step collective: the
tensor-parallel layers' all-reduces, the exchange, a pipeline's activations and tokens (gloo's cost
~0.5-2 ms a collective here, the mesh ~0.2 ms); gloo keeps the start, the load checks and long deltas. The exchange is one all-reduce in
the common case: a fixed int64 buffer of [payload length, stop votes,
check sum, check sum of squares, payload inlined up to INLINE_PAYLOAD_BYTES]. Rank 0 writes the payload,
the other ranks zeros, so the sum is rank 0's bytes exactly; a longer payload follows in one broadcast.
The check: each rank adds a hash of the tokens it sampled since the last exchange; with n ranks,
n * sum(c^2) == sum(c)^2 exactly when every rank's c is equal, so diverged tensor-parallel samplers are
caught at no extra collective.
"""

from __future__ import annotations

import zlib
from datetime import timedelta

import torch
import torch.distributed as dist

from shoal.runner.mesh import SocketMesh
from shoal.runner.spec import RunnerSpec


class GroupStartError(RuntimeError):
    """The group could not start as the instance describes it."""


def start_group(spec: RunnerSpec) -> dist.Store | None:
    """Join the instance's group (no-op for a single-shard instance); GroupStartError naming the problem.
    Returns the group's store (None for a single shard)."""
    if spec.world_size == 1:
        return None
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
    # NCCL: bind the group to this rank's GPU up front (its communicator is created eagerly, on the
    # right device, and the barrier need not guess the device from the rank).
    device = torch.device(spec.device) if spec.backend == "nccl" else None
    try:
        dist.init_process_group(
            spec.backend,
            store=dist.PrefixStore("group", store),
            rank=spec.rank,
            world_size=spec.world_size,
            timeout=timeout,
            device_id=device,
        )
        dist.barrier(device_ids=[device.index] if device is not None and device.index is not None else None)
    except Exception as exc:
        raise GroupStartError(
            f"rank {spec.rank} of {spec.world_size}: the {spec.backend} group did not form: {_first_line(exc)}"
        ) from exc
    return store


def open_channel(spec: RunnerSpec, store: dist.Store | None) -> StepChannel:
    """The step channel; a CPU group also connects its socket mesh (see mesh.py) for the layers'
    all-reduces, the exchange, and a pipeline's activations and tokens."""
    mesh = None
    if store is not None and spec.backend == "gloo":
        mesh = SocketMesh.connect(
            store, spec.instance_id, spec.rank, spec.world_size, spec.rendezvous.host, spec.group_timeout_s
        )
    return StepChannel(spec, mesh)


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


INLINE_PAYLOAD_BYTES = 1024
_HEADER = 4  # length, stop votes, check sum, check sum of squares
_CHECK_MODULUS = 1 << 20  # keeps world_size * check^2 far inside int64


class RankDivergenceError(RuntimeError):
    """Ranks that must hold the same engine state sampled different tokens."""


class StepChannel:
    """The collectives of one engine step. With a world of one, every call is local."""

    def __init__(self, spec: RunnerSpec, mesh: SocketMesh | None = None) -> None:
        self.mesh = mesh
        self.rank = spec.rank
        self.world_size = spec.world_size
        self.sampling_rank = spec.sampling_rank
        # Tensor-parallel ranks hold full logits after the LM head's all-reduce: each samples for itself.
        self.samples_locally = spec.sharding == "tensor" or spec.world_size == 1
        # NCCL moves only GPU tensors; gloo only CPU ones.
        self.device = torch.device(spec.device) if spec.backend == "nccl" else torch.device("cpu")
        self._check = 0
        # Pipeline: the step is passed along the stages (see the module doc).
        self.chained = spec.sharding == "pipeline" and spec.world_size > 1
        self._stop_wished = False  # the group's stop wishes as far as this rank knows (chained)
        self._step_end: bool | None = None  # this step's end, once sent or received (chained)

    def note_sampled(self, token_ids: list[int]) -> None:
        """Fold locally sampled tokens into the check the next exchange compares across ranks."""
        data = b"".join(t.to_bytes(8, "little", signed=True) for t in token_ids)
        self._check = (self._check * 31 + zlib.crc32(data)) % _CHECK_MODULUS

    def begin_step(self, payload: bytes, stop: bool) -> tuple[bytes, bool]:
        """Rank 0's `payload` reaches every rank; `stop`: this rank wishes to stop. Returns the payload
        and whether the group stops now, before the step (tensor parallel, or one rank); a pipeline
        agrees at the step's end (`end_step`) and returns False here."""
        if not self.chained:
            return self.exchange(payload, stop)
        self._step_end = None
        if self.rank > 0:
            (length, upstream) = self._recv_words(2, self.rank - 1)
            payload = self._recv_bytes(length, self.rank - 1) if length else b""
            stop = stop or bool(upstream)
        if self.rank < self.world_size - 1:
            self._send_words([len(payload), int(stop)], self.rank + 1)
            if payload:
                self._send_bytes(payload, self.rank + 1)
        self._stop_wished = stop
        return payload, False

    def end_step(self) -> bool:
        """After this rank's step: whether the group stops now (a pipeline's agreed stop; always False
        for tensor parallel, which agreed in `begin_step`). In a step that sampled nothing the sampling
        rank sends the step's end here, and the others wait for it."""
        if not self.chained:
            return False
        if self._step_end is None:
            self.share_tokens([] if self.rank == self.sampling_rank else None, 0)
        stop, self._step_end = bool(self._step_end), None
        return stop

    def exchange(self, payload: bytes, stop: bool) -> tuple[bytes, bool]:
        """Rank 0's `payload` reaches every rank; True when any rank wished to stop.
        RankDivergenceError when the ranks sampled different tokens since the last exchange."""
        if self.world_size == 1:
            return payload, stop
        own = payload if self.rank == 0 else b""
        inline = own[:INLINE_PAYLOAD_BYTES]
        words = torch.zeros(_HEADER + INLINE_PAYLOAD_BYTES // 8, dtype=torch.int64)
        check, self._check = self._check, 0
        words[:_HEADER] = torch.tensor([len(own), int(stop), check, check * check])
        if inline:
            words.view(torch.uint8)[_HEADER * 8 : _HEADER * 8 + len(inline)] = torch.frombuffer(
                bytearray(inline), dtype=torch.uint8
            )
        if self.mesh is not None:
            self.mesh.all_reduce(words)
        else:
            buffer = words.to(self.device)
            dist.all_reduce(buffer)
            words = buffer.cpu()
        length, num_stops, check_sum, square_sum = (int(v) for v in words[:_HEADER].tolist())
        if self.world_size * square_sum != check_sum * check_sum:
            raise RankDivergenceError(
                f"rank {self.rank}: the {self.world_size} ranks sampled different tokens in the last step "
                "(their logits differed); the instance cannot continue in lockstep"
            )
        received = words.view(torch.uint8)[_HEADER * 8 : _HEADER * 8 + min(length, INLINE_PAYLOAD_BYTES)]
        data = received.numpy().tobytes()
        if length > INLINE_PAYLOAD_BYTES:
            rest = length - INLINE_PAYLOAD_BYTES
            if self.rank == 0:
                tail = torch.frombuffer(bytearray(own[INLINE_PAYLOAD_BYTES:]), dtype=torch.uint8).to(
                    self.device
                )
            else:
                tail = torch.empty(rest, dtype=torch.uint8, device=self.device)
            dist.broadcast(tail, src=0)
            data += tail.cpu().numpy().tobytes()
        return data, num_stops > 0

    def send_hidden(self, hidden: torch.Tensor) -> None:
        if self.mesh is not None:
            self.mesh.send(hidden, dst=self.rank + 1)
            return
        dist.send(hidden.contiguous().to(self.device), dst=self.rank + 1)

    def recv_hidden(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        if self.mesh is not None:
            return self.mesh.recv(shape, dtype, src=self.rank - 1)
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(buffer, src=self.rank - 1)
        return buffer

    def share_tokens(self, token_ids: list[int] | None, count: int) -> list[int]:
        """Pipeline: the sampling rank passes its `count` sampled ids, with the group's stop, to every other
        rank, which pass None and get the ids back."""
        if self.rank == self.sampling_rank:
            assert token_ids is not None and len(token_ids) == count
            self._step_end = self._stop_wished
            for rank in range(self.world_size):
                if rank != self.rank:
                    self._send_words([int(self._stop_wished), *token_ids], rank)
            return token_ids
        stop, *received = self._recv_words(1 + count, self.sampling_rank)
        self._step_end = bool(stop)
        return received

    def _send_words(self, words: list[int], dst: int) -> None:
        tensor = torch.tensor(words, dtype=torch.int64)
        if self.mesh is not None:
            self.mesh.send(tensor, dst=dst)
        else:
            dist.send(tensor.to(self.device), dst=dst)

    def _recv_words(self, count: int, src: int) -> list[int]:
        if self.mesh is not None:
            tensor = self.mesh.recv((count,), torch.int64, src=src)
        else:
            tensor = torch.empty(count, dtype=torch.int64, device=self.device)
            dist.recv(tensor, src=src)
        return [int(v) for v in tensor.tolist()]

    def _send_bytes(self, data: bytes, dst: int) -> None:
        if self.mesh is not None:
            self.mesh.send_bytes(data, dst=dst)
        else:
            dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device), dst=dst)

    def _recv_bytes(self, size: int, src: int) -> bytes:
        if self.mesh is not None:
            return self.mesh.recv_bytes(size, src=src)
        buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        dist.recv(buffer, src=src)
        return buffer.cpu().numpy().tobytes()

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

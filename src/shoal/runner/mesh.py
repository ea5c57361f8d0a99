"""A full mesh of TCP connections between the ranks of one CPU instance: the all-reduce the tensor-parallel
layers make twice per layer, the step exchange, and a pipeline's activations and tokens, without gloo's
threads.

Why: a gloo all-reduce hands each message through three threads (caller, the process group's worker, the
transport's epoll loop) and costs 0.5-2.2 ms on the 2-core dev box, most when a rank is pinned to one
core and its loop thread competes with the compute; a decode step of a 16-layer model makes 35 of them.
Here the calling thread sends its tensor to every peer and reads theirs on non-blocking sockets (no
thread hop): ~0.2 ms for a 2048-float row. Every rank adds the N tensors in rank order, so every rank
holds the same bits (the samplers rely on it, see stage.py).

Setup (after the gloo group has started, through its store): each rank listens on the address it reaches
rank 0 from, publishes it, connects to every lower rank and accepts every higher one; a connecting peer
names its instance and rank first, and a stranger is refused. A peer that closes or stays silent for
`timeout_s` fails the call with a MeshError naming it (the runner then fails, like on a gloo error).
Used for gloo (CPU) instances; NCCL instances keep NCCL's collectives. Every rank makes the same calls
in the same order, so each connection's byte stream needs no framing.
"""

from __future__ import annotations

import select
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

SOCKET_BUFFER_BYTES = 4 << 20
_HELLO_BYTES = 256


class MeshError(RuntimeError):
    """A peer of the mesh is gone, silent, or not who it should be."""


class SocketMesh:
    """`Communicator` (shoal.engine.parallel) over direct sockets; `peers[r]` is None for this rank."""

    def __init__(self, rank: int, peers: list[socket.socket | None], timeout_s: float) -> None:
        self._rank = rank
        self._peers = peers
        self._timeout_s = timeout_s

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return len(self._peers)

    @classmethod
    def connect(
        cls, store: dist.Store, instance_id: str, rank: int, world_size: int, host: str, timeout_s: float
    ) -> SocketMesh:
        listener = socket.create_server((_local_address(host), 0))
        peers: list[socket.socket | None] = [None] * world_size
        try:
            address, port = listener.getsockname()[:2]
            store.set(f"shoal/mesh/{rank}", f"{address}:{port}")
            for lower in range(rank):
                key = f"shoal/mesh/{lower}"
                store.wait([key], timedelta(seconds=timeout_s))
                peer_host, peer_port = store.get(key).decode().rsplit(":", 1)
                conn = socket.create_connection((peer_host, int(peer_port)), timeout=timeout_s)
                conn.sendall(f"{instance_id}|{rank}".encode().ljust(_HELLO_BYTES))
                peers[lower] = conn
            listener.settimeout(timeout_s)
            for _ in range(rank + 1, world_size):
                conn, _ = listener.accept()
                conn.settimeout(timeout_s)
                hello = _recv_exactly(conn, _HELLO_BYTES).decode(errors="replace").strip()
                their_instance, _, their_rank = hello.partition("|")
                if (
                    their_instance != instance_id
                    or not their_rank.isdigit()
                    or not rank < int(their_rank) < world_size
                ):
                    conn.close()
                    raise MeshError(
                        f"rank {rank}: a peer introduced itself as {hello!r}, not a rank of {instance_id}"
                    )
                peers[int(their_rank)] = conn
        except (OSError, RuntimeError) as exc:
            for peer in peers:
                if peer is not None:
                    peer.close()
            if isinstance(exc, MeshError):
                raise
            raise MeshError(f"rank {rank}: the mesh between the ranks did not form: {exc}") from exc
        finally:
            listener.close()
        for peer in peers:
            if peer is not None:
                peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
                peer.setblocking(False)
        return cls(rank, peers, timeout_s)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks in place (added in rank order on every rank) and return it."""
        if len(self._peers) == 1:
            return tensor
        local = tensor.detach().contiguous()
        data = local.view(-1).view(torch.uint8).numpy().data
        received = {r: bytearray(len(data)) for r, peer in enumerate(self._peers) if peer is not None}
        self._exchange(data, received)
        parts = [
            local if r == self._rank else torch.frombuffer(received[r], dtype=local.dtype).view(local.shape)
            for r in range(len(self._peers))
        ]
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        tensor.copy_(total)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Point to point: `tensor`'s bytes to rank `dst`, which calls `recv` with its shape and dtype."""
        data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().data
        self._pump(dst, data, None)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype)
        self._pump(src, None, buffer.view(-1).view(torch.uint8).numpy().data)
        return buffer

    def send_bytes(self, data: bytes, dst: int) -> None:
        """Point to point: raw bytes to rank `dst`, which calls `recv_bytes` with their length."""
        self._pump(dst, memoryview(data), None)

    def recv_bytes(self, size: int, src: int) -> bytes:
        buffer = bytearray(size)
        self._pump(src, None, memoryview(buffer))
        return bytes(buffer)

    def _pump(self, rank: int, outgoing: memoryview | None, incoming: memoryview | None) -> None:
        peer = self._peers[rank]
        if peer is None:
            raise MeshError(f"rank {self._rank} cannot send to or receive from itself")
        done = 0
        total = len(outgoing if outgoing is not None else incoming)  # type: ignore[arg-type]
        deadline = time.monotonic() + self._timeout_s
        while done < total:
            try:
                if outgoing is not None:
                    count = peer.send(outgoing[done:])
                else:
                    assert incoming is not None
                    count = peer.recv_into(incoming[done:])
                    if count == 0:
                        raise MeshError(f"rank {self._rank}: rank {rank} closed its connection")
                done += count
                deadline = time.monotonic() + self._timeout_s
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                raise MeshError(f"rank {self._rank}: talking to rank {rank} failed: {exc}") from exc
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise MeshError(
                    f"rank {self._rank}: rank {rank} did not take part within {self._timeout_s:g} s"
                )
            if outgoing is not None:
                select.select([], [peer], [], wait)
            else:
                select.select([peer], [], [], wait)

    def _exchange(self, data: memoryview, received: dict[int, bytearray]) -> None:
        """Send `data` to every peer while reading each peer's bytes, never blocking on a full buffer."""
        size = len(data)
        sent = dict.fromkeys(received, 0)
        got = dict.fromkeys(received, 0)
        views = {r: memoryview(buffer) for r, buffer in received.items()}
        deadline = time.monotonic() + self._timeout_s
        while True:
            progress = False
            for r in received:
                peer = self._peers[r]
                assert peer is not None
                if sent[r] < size:
                    try:
                        sent[r] += peer.send(data[sent[r] :])
                        progress = True
                    except BlockingIOError:
                        pass
                    except OSError as exc:
                        raise MeshError(f"rank {self._rank}: sending to rank {r} failed: {exc}") from exc
                if got[r] < size:
                    try:
                        count = peer.recv_into(views[r][got[r] :])
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        raise MeshError(f"rank {self._rank}: receiving from rank {r} failed: {exc}") from exc
                    if count == 0:
                        raise MeshError(f"rank {self._rank}: rank {r} closed its tensor-parallel connection")
                    got[r] += count
                    progress = True
            if all(v == size for v in sent.values()) and all(v == size for v in got.values()):
                return
            if progress:
                deadline = time.monotonic() + self._timeout_s
                continue
            wait = deadline - time.monotonic()
            if wait <= 0:
                silent = [r for r in received if got[r] < size]
                raise MeshError(
                    f"rank {self._rank}: no data from rank(s) {silent} within {self._timeout_s:g} s"
                )
            readers = [peer for r in received if got[r] < size and (peer := self._peers[r]) is not None]
            writers = [peer for r in received if sent[r] < size and (peer := self._peers[r]) is not None]
            select.select(readers, writers, [], wait)

    def close(self) -> None:
        for peer in self._peers:
            if peer is not None:
                peer.close()


def _local_address(host: str) -> str:
    """The address of this machine's interface that reaches `host` (no packet is sent)."""
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return str(probe.getsockname()[0])


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = conn.recv(size - len(chunks))
        if not chunk:
            raise MeshError("a peer closed the connection while introducing itself")
        chunks += chunk
    return bytes(chunks)

"""The tensor-parallel socket mesh, its ranks as threads of one process over loopback: sums equal on every
rank (bit for bit, in rank order) for small and large tensors of any dtype; a stranger, a closed peer
and a silent one are errors that name what happened."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from shoal.runner.mesh import MeshError, SocketMesh

TIMEOUT_S = 10.0


def run_ranks(world_size: int, body: Callable[[SocketMesh], Any], timeout_s: float = TIMEOUT_S) -> list[Any]:
    store = dist.HashStore()
    results: list[Any] = [None] * world_size

    def rank_main(rank: int) -> None:
        try:
            mesh = SocketMesh.connect(store, "inst", rank, world_size, "127.0.0.1", timeout_s)
            try:
                results[rank] = body(mesh)
            finally:
                mesh.close()
        except Exception as exc:  # the top of the thread: the test reads it
            results[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a rank hung"
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_reduce_gives_every_rank_the_same_rank_ordered_sum(world_size: int) -> None:
    shapes = [
        ((1, 2048), torch.float32),
        ((3, 64), torch.bfloat16),
        ((1 << 18,), torch.float32),
        ((4,), torch.int64),
    ]

    def inputs(rank: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(rank)
        return [(torch.randn(shape, generator=generator) * 100).to(dtype) for shape, dtype in shapes]

    def body(mesh: SocketMesh) -> list[torch.Tensor]:
        tensors = inputs(mesh.rank)
        for tensor in tensors:
            assert mesh.all_reduce(tensor) is tensor  # in place
        return tensors

    results = run_ranks(world_size, body)
    for index in range(len(shapes)):
        expected = inputs(0)[index].clone()
        for rank in range(1, world_size):
            expected += inputs(rank)[index]
        for rank in range(world_size):
            assert not isinstance(results[rank], Exception), results[rank]
            assert torch.equal(results[rank][index], expected)


def test_a_stranger_is_refused() -> None:
    store = dist.HashStore()
    outcome: list[Any] = []

    def rank_zero_waits_for_rank_one() -> None:
        try:
            SocketMesh.connect(store, "inst", 0, 2, "127.0.0.1", TIMEOUT_S)
        except MeshError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=rank_zero_waits_for_rank_one)
    thread.start()
    store.wait(["shoal/mesh/0"])
    host, port = store.get("shoal/mesh/0").decode().rsplit(":", 1)
    with socket.create_connection((host, int(port))) as stranger:
        stranger.sendall(b"other-instance|1".ljust(256))
    thread.join(timeout=30)
    assert len(outcome) == 1 and "other-instance|1" in str(outcome[0])


def test_a_closed_or_silent_peer_fails_the_call() -> None:
    def rank_one_leaves(mesh: SocketMesh) -> Any:
        if mesh.rank == 1:
            return "left"  # run_ranks closes its sockets
        try:
            mesh.all_reduce(torch.ones(8))
        except MeshError as exc:
            return exc
        return "no error"

    results = run_ranks(2, rank_one_leaves)
    # closed (EOF) or reset (rank 0's bytes reached a closed socket first): either way, rank 1 is named
    assert isinstance(results[0], MeshError) and "rank 1" in str(results[0])

    release = threading.Event()

    def rank_one_is_silent(mesh: SocketMesh) -> Any:
        if mesh.rank == 1:
            release.wait(10)
            return "silent"
        try:
            mesh.all_reduce(torch.ones(8))
        except MeshError as exc:
            return exc
        finally:
            release.set()
        return "no error"

    results = run_ranks(2, rank_one_is_silent, timeout_s=0.5)
    assert isinstance(results[0], MeshError) and "no data from rank(s) [1] within 0.5 s" in str(results[0])

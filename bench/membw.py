"""This machine's memory bandwidth, and what it allows a memory-bound decode step to reach.

A decode step reads every matmul weight once (a matrix-vector product per weight), so
tokens/s <= bandwidth / weight bytes per token. Run alone: `.venv/bin/python bench/membw.py`.

`measure_pinned_read_bandwidth(cores)` reads from one process pinned to each core at once: what ranks
pinned to those cores can stream together. On the 2-core dev box one core alone reads 18-29 GB/s and
both together mostly 26-35 GB/s (1.2-1.7x), now and then ~55 GB/s: the VM shares its memory with other
tenants. A decode bound by its weight reads gains from a second rank only what the second core adds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier

import torch


def measure_bandwidth(num_bytes: int = 512 << 20, reps: int = 5) -> dict[str, float]:
    """Median GB/s of a large sum (read only) and a large copy (read + write), over `reps` runs."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    read, copy = [], []
    for _ in range(reps + 1):  # the first run pages memory in
        start = time.perf_counter()
        src.sum()
        read.append(num_bytes / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        dst.copy_(src)
        copy.append(2 * num_bytes / (time.perf_counter() - start) / 1e9)
    return {"read": statistics.median(read[1:]), "copy": statistics.median(copy[1:])}


def measure_pinned_read_bandwidth(
    cores: Sequence[int], num_bytes: int = 64 << 20, duration_s: float = 2.0
) -> list[float]:
    """Read GB/s of one single-threaded process per core in `cores`, in that order: each sums its own
    `num_bytes` buffer over and over for the same `duration_s` window, so they read at the same time
    throughout (a reader that finished early would leave the others the whole memory system). A reader
    that fails (e.g. a core this process may not use) raises here instead of leaving the others waiting."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(cores))
    pipes = [context.Pipe(duplex=False) for _ in cores]
    workers = [
        context.Process(target=_pinned_reader, args=(core, num_bytes, duration_s, barrier, sender))
        for core, (_, sender) in zip(cores, pipes, strict=True)
    ]
    for worker in workers:
        worker.start()
    for _, sender in pipes:
        sender.close()  # the readers hold theirs: a reader's exit is then EOF here, not a wait forever
    try:
        rates = []
        for core, (receiver, _) in zip(cores, pipes, strict=True):
            try:
                rates.append(float(receiver.recv()))
            except EOFError:
                raise RuntimeError(f"the reader pinned to core {core} ended without a result") from None
        return rates
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()


def measure_core_scaling(first: int, second: int) -> tuple[float, float]:
    """Read GB/s of a process pinned to `first` alone, and of one on each of the two cores together."""
    alone = measure_pinned_read_bandwidth([first])[0]
    return alone, sum(measure_pinned_read_bandwidth([first, second]))


def _pinned_reader(
    core: int, num_bytes: int, duration_s: float, barrier: Barrier, result: Connection
) -> None:
    try:
        os.sched_setaffinity(0, {core})
        torch.set_num_threads(1)
        src = torch.ones(num_bytes // 4, dtype=torch.float32)
        src.sum()  # pages the buffer in
    finally:
        barrier.wait(timeout=60)  # a reader that failed still arrives, so the others go on
    start = time.perf_counter()
    passes = 0
    while time.perf_counter() - start < duration_s:
        src.sum()
        passes += 1
    result.send(passes * num_bytes / (time.perf_counter() - start) / 1e9)


def decode_weight_bytes(
    num_layers: int, hidden: int, intermediate: int, q_size: int, kv_size: int, vocab: int
) -> dict[str, float]:
    """Bytes of matmul weights one decode token reads, per weight format (KV cache reads left out)."""
    linear = num_layers * (hidden * (q_size + 2 * kv_size) + q_size * hidden + 3 * hidden * intermediate)
    head = vocab * hidden
    int4 = 0.5 + 4 / 32  # 4-bit codes + a bf16 scale and zero per group of 32
    return {
        "bf16": 2.0 * (linear + head),
        "int8": 1.0 * (linear + head),
        "int4": int4 * (linear + head),
        # int4 linears (re-encoded Q4_1); the head (Q8_0) as int4 for every row plus int8 rows of the
        # top 64 candidates (a negligible read)
        "auto": int4 * (linear + head),
        "llama.cpp Q4_1": 20 / 32 * linear + 34 / 32 * head,  # Q4_1 linears, Q8_0 head
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bw = measure_bandwidth()
    print(
        f"memory bandwidth: read {bw['read']:.1f} GB/s, copy {bw['copy']:.1f} GB/s ({args.threads} threads)"
    )
    if len(os.sched_getaffinity(0)) >= 2:
        first, second = sorted(os.sched_getaffinity(0))[:2]
        alone, together = measure_core_scaling(first, second)
        print(
            f"read from processes pinned to one core each: core {first} alone {alone:.1f} GB/s, cores {first} and"
            f" {second} together {together:.1f} GB/s ({together / alone:.2f}x)"
        )
    for fmt, num_bytes in decode_weight_bytes(30, 576, 1536, 576, 192, 49152).items():
        print(
            f"SmolLM2-135M {fmt:>15}: {num_bytes / 2**20:6.1f} MiB/token -> <= {bw['read'] * 1e9 / num_bytes:6.0f} tok/s"
        )


if __name__ == "__main__":
    main()

"""This machine's memory bandwidth, and what it allows a memory-bound decode step to reach.

A decode step reads every matmul weight once (a matrix-vector product per weight), so
tokens/s <= bandwidth / weight bytes per token. Run alone: `.venv/bin/python bench/membw.py`.
"""

from __future__ import annotations

import argparse
import statistics
import time

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
    for fmt, num_bytes in decode_weight_bytes(30, 576, 1536, 576, 192, 49152).items():
        print(
            f"SmolLM2-135M {fmt:>15}: {num_bytes / 2**20:6.1f} MiB/token -> <= {bw['read'] * 1e9 / num_bytes:6.0f} tok/s"
        )


if __name__ == "__main__":
    main()

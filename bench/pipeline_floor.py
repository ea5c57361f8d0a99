"""What splitting a model into two processes costs, without nodes: the pipeline part of bench/sharding.py
minus the cluster around it.

The embedded SmolLM2 with a node runner's settings (auto quantization, compiled decode, 1 thread) decodes
one stream greedily in three processes: the whole model in one, and its two halves (layers [0, split) and
[split, end)) in two that pass the hidden states and the token over a loopback TCP socket, as a
pipeline's ranks do. Each process reports the median wall time of a decode step (the pipeline's from
rank 0: its stage, the send, and the wait for the token) and the median CPU time its own compute takes.
The three take turns, round by round. Prints per round, then the ratio of step periods: the most a
pipeline of the same split can reach on this machine before any node, HTTP or scheduling work, and the
two stages' compute CPU against the whole model's (the same work, split).

    .venv/bin/python bench/pipeline_floor.py [--split 16] [--steps 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import time
from multiprocessing.connection import Connection

import torch

PROMPT = (1, 2, 3, 4, 5, 6, 7, 8)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = sock.recv(size, socket.MSG_WAITALL)  # a blocking socket: short only at the peer's close
    if len(data) != size:
        raise ConnectionError("the other stage closed the socket")
    return data


def _run(role: str, split: int, steps: int, port: int, report: Connection) -> None:
    from shoal.engine.batch import ScheduledChunk
    from shoal.engine.embedded import embedded_model_path
    from shoal.engine.model_runner import ModelRunner
    from shoal.engine.parallel import ShardSpec
    from shoal.engine.quant import quantize_model

    torch.set_num_threads(1)
    shard = {"whole": None, "first": ShardSpec(0, 1, 0, split), "second": ShardSpec(0, 1, split, None)}[role]
    runner = ModelRunner(
        embedded_model_path(), shard=shard, compile_decode=True, kv_cache_bytes=64 << 20, max_model_len=2048
    )
    quantize_model(runner.model, "auto", device="cpu")
    hidden_size = runner.config.hidden_size
    sock: socket.socket | None = None
    if role == "first":
        with socket.create_server(("127.0.0.1", port)) as server:
            report.send("listening")
            sock, _ = server.accept()
    elif role == "second":
        sock = socket.create_connection(("127.0.0.1", port))
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    table = tuple(range(64))
    periods: list[float] = []
    compute: list[float] = []
    token = 5
    with torch.inference_mode():
        for step in range(-1, steps):
            if step < 0:  # prefill, then decode steps over a context that stays under the table's reach
                chunk = ScheduledChunk(0, PROMPT, 0, table, True)
            else:
                chunk = ScheduledChunk(0, (token,), len(PROMPT) + step % 512, table, True)
            inputs = runner.prepare([chunk])
            start = time.perf_counter()
            hidden = None
            if role == "second":
                assert sock is not None
                rows = len(chunk.token_ids)
                data = bytearray(_recv_exactly(sock, rows * hidden_size * 2))
                hidden = torch.frombuffer(data, dtype=torch.bfloat16).view(rows, hidden_size)
            cpu = time.thread_time()
            output = runner.run(inputs, hidden)
            compute.append(time.thread_time() - cpu)
            if role == "first":
                assert sock is not None
                sock.sendall(output.contiguous().view(torch.uint8).numpy().tobytes())
                token = int.from_bytes(_recv_exactly(sock, 8), "little")
            elif role == "second":
                assert sock is not None
                token = int(output[-1].argmax())
                sock.sendall(token.to_bytes(8, "little"))
            else:
                token = int(output[-1].argmax())
            periods.append(time.perf_counter() - start)
    skip = min(20, steps // 4)  # the first steps compile and record the direct-call plan
    report.send((statistics.median(periods[skip:]), statistics.median(compute[skip:])))


def _measure(roles: list[str], split: int, steps: int) -> dict[str, tuple[float, float]]:
    context = multiprocessing.get_context("spawn")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pipes, processes = {}, []
    for role in roles:
        ours, theirs = context.Pipe()
        process = context.Process(target=_run, args=(role, split, steps, port, theirs), daemon=True)
        process.start()
        pipes[role] = ours
        processes.append(process)
        if role == "first" and pipes[role].recv() != "listening":
            raise RuntimeError("the first stage did not start")
    results = {role: pipe.recv() for role, pipe in pipes.items()}
    for process in processes:
        process.join(60)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", type=int, default=16, help="the second stage's first layer")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ratios, cpu_ratios = [], []
    for round_ in range(args.rounds):
        whole = _measure(["whole"], args.split, args.steps)["whole"]
        split = _measure(["first", "second"], args.split, args.steps)
        period = split["first"][0]
        stages_cpu = split["first"][1] + split["second"][1]
        ratios.append(whole[0] / period)
        cpu_ratios.append(stages_cpu / whole[1])
        print(
            f"round {round_ + 1}: one process {1e3 * whole[0]:.2f} ms a step ({1e3 * whole[1]:.2f} ms compute); "
            f"two stages {1e3 * period:.2f} ms a step (compute {1e3 * split['first'][1]:.2f} + "
            f"{1e3 * split['second'][1]:.2f} ms): {ratios[-1]:.2f}x the speed, {cpu_ratios[-1]:.2f}x the compute",
            flush=True,
        )
    print(
        f"two stages / one process: {statistics.median(ratios):.2f}x the decode speed, "
        f"{statistics.median(cpu_ratios):.2f}x the compute CPU (medians of {args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()

"""Cluster plane benchmark: 3 real `shoal node` processes on loopback, N label commands as fast as possible.

Prints committed-event throughput (events/s, from the first submission to the last event applied on all
nodes) and end-to-end latency p50/p99 from a command's submission to its event being applied on all 3
nodes, observed through each node's /events SSE stream.

    .venv/bin/python bench/cluster.py --commands 1000 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from shoal.local_cluster import LocalCluster, LocalNode


async def watch(node: LocalNode, applied_at: dict[int, list[float]], ready: asyncio.Event) -> None:
    async with (
        httpx.AsyncClient(timeout=None) as client,
        client.stream("GET", f"{node.api_url}/events") as response,
    ):
        ready.set()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                index = json.loads(line[len("data: ") :])["index"]
                applied_at.setdefault(index, []).append(time.perf_counter())


async def submit_all(
    nodes: list[LocalNode], target: str, num_commands: int, concurrency: int
) -> list[tuple[float, int]]:
    """(submitted_at, event index) per accepted command; round-robin over the nodes' APIs."""
    results: list[tuple[float, int]] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(num_commands):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            node = nodes[i % len(nodes)]
            submitted = time.perf_counter()
            response = await client.post(
                f"{node.api_url}/nodes/{target}/labels", json={"key": "bench", "value": str(i)}
            )
            response.raise_for_status()
            results.append((submitted, response.json()["first_index"]))

    async with httpx.AsyncClient(timeout=30.0) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


async def run(num_commands: int, concurrency: int, root: Path) -> None:
    cluster = LocalCluster(root, cluster="bench", node_timeout_s=10.0, heartbeat_interval_s=0.5)
    try:
        nodes = cluster.add(3)
        cluster.wait_until(lambda: all(n.get("/health") for n in nodes), 60.0, "node APIs")
        cluster.wait_until(
            lambda: (
                len({(s["master"], s["last_index"]) for s in (n.state() for n in nodes)}) == 1
                and len(nodes[0].state()["nodes"]) == 3
            ),
            30.0,
            "agreement",
        )
        target = nodes[0].node_id()
        applied_at: dict[int, list[float]] = {}
        readies = [asyncio.Event() for _ in nodes]
        watchers = [asyncio.create_task(watch(n, applied_at, r)) for n, r in zip(nodes, readies, strict=True)]
        await asyncio.gather(*(r.wait() for r in readies))
        started = time.perf_counter()
        results = await submit_all(nodes, target, num_commands, concurrency)
        wanted = {index for _, index in results}
        deadline = time.perf_counter() + 30.0
        while time.perf_counter() < deadline and any(len(applied_at.get(i, [])) < 3 for i in wanted):
            await asyncio.sleep(0.01)
        for task in watchers:
            task.cancel()
        complete = [(s, i) for s, i in results if len(applied_at.get(i, [])) >= 3]
        latencies_ms = sorted((max(applied_at[i]) - s) * 1000 for s, i in complete)
        finished = max(max(applied_at[i]) for _, i in complete)
        elapsed = finished - started
        p99 = latencies_ms[min(len(latencies_ms) - 1, int(0.99 * len(latencies_ms)))]
        print(
            f"3 nodes, {num_commands} label commands, concurrency {concurrency} (HTTP round-robin over nodes)"
        )
        print(f"  applied on all 3 nodes: {len(complete)}/{num_commands}")
        print(f"  throughput: {len(complete) / elapsed:.0f} events/s committed and applied everywhere")
        print(
            f"  latency submit -> applied on all 3: p50 {statistics.median(latencies_ms):.1f} ms, "
            f"p99 {p99:.1f} ms, max {latencies_ms[-1]:.1f} ms"
        )
    finally:
        cluster.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as root:
        asyncio.run(run(args.commands, args.concurrency, Path(root)))


if __name__ == "__main__":
    main()

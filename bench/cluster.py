"""Cluster plane benchmark: 3 real `shoal node` processes on loopback, N label commands as fast as possible.

Prints committed-event throughput (events/s, from the first submission to the last event applied on all
nodes) and end-to-end latency p50/p99 from a command's submission to its event being applied on all 3
nodes, observed through each node's /events SSE stream.

Two ways in, measured in the same cluster one after the other:
- `http`: POST /nodes/{id}/labels round-robin over the 3 nodes' APIs (what a user does);
- `transport`: this process joins the cluster's transport under its own id and sends the commands to the
  master itself, the way a node's API hands them on (`CommandSender`), so the HTTP layer is left out.

    .venv/bin/python bench/cluster.py --commands 1000 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import httpx

from shoal.local_cluster import LocalCluster, LocalNode, free_port
from shoal.net.config import TransportSettings
from shoal.net.sealing import Sealer
from shoal.net.transport import Transport
from shoal.node import TOPIC
from shoal.node_commands import CommandSender
from shoal.types import (
    CommandAccepted,
    CommandBatch,
    NodeId,
    ReplyBatch,
    SetNodeLabel,
    decode_wire_message,
    encode_wire_message,
)

Submit = Callable[[int], Awaitable[int]]  # command number -> index of its event


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


async def submit_all(submit: Submit, num_commands: int, concurrency: int) -> list[tuple[float, int]]:
    """(submitted_at, event index) per accepted command, `concurrency` commands in flight."""
    results: list[tuple[float, int]] = []
    numbers = iter(range(num_commands))

    async def worker() -> None:
        for i in numbers:
            submitted = time.perf_counter()
            results.append((submitted, await submit(i)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def http_submitter(client: httpx.AsyncClient, nodes: list[LocalNode], target: str) -> Submit:
    async def submit(i: int) -> int:
        node = nodes[i % len(nodes)]
        response = await client.post(
            f"{node.api_url}/nodes/{target}/labels", json={"key": "bench", "value": f"http-{i}"}
        )
        response.raise_for_status()
        return int(response.json()["first_index"])

    return submit


async def open_transport(cluster: LocalCluster, nodes: list[LocalNode]) -> Transport:
    settings = TransportSettings.loopback(
        cluster.cluster, port=free_port(), peers=tuple(n.endpoint for n in nodes)
    )
    sealer = Sealer(None, cluster.cluster, NodeId(f"bench-{uuid.uuid4().hex[:12]}"))
    transport = await Transport.open(settings, sealer)
    deadline = time.monotonic() + 10
    while len(transport.peers()) < len(nodes) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return transport


async def transport_submitter(
    transport: Transport, master: NodeId, target: str
) -> tuple[Submit, list[asyncio.Task[None]]]:
    sender = CommandSender(transport.node_id, 30.0, lambda: master)

    async def send(node_id: NodeId, batch: CommandBatch) -> None:
        await transport.send(node_id, TOPIC, encode_wire_message(batch))

    async def receive_replies() -> None:
        async for _, payload in transport.subscribe_direct(TOPIC):
            message = decode_wire_message(payload)
            if isinstance(message, ReplyBatch):
                for reply in message.replies:
                    sender.resolve(reply)

    tasks = [asyncio.create_task(receive_replies()), asyncio.create_task(sender.run(send))]

    async def submit(i: int) -> int:
        reply = await sender.submit(SetNodeLabel(node_id=NodeId(target), key="bench", value=f"direct-{i}"))
        if not isinstance(reply, CommandAccepted):
            raise RuntimeError(f"command {i} was not accepted: {reply}")
        return int(reply.first_index)

    return submit, tasks


async def measure(
    label: str, submit: Submit, applied_at: dict[int, list[float]], num_commands: int, concurrency: int
) -> None:
    started = time.perf_counter()
    results = await submit_all(submit, num_commands, concurrency)
    wanted = {index for _, index in results}
    deadline = time.perf_counter() + 30.0
    while time.perf_counter() < deadline and any(len(applied_at.get(i, [])) < 3 for i in wanted):
        await asyncio.sleep(0.01)
    complete = [(s, i) for s, i in results if len(applied_at.get(i, [])) >= 3]
    latencies_ms = sorted((max(applied_at[i]) - s) * 1000 for s, i in complete)
    elapsed = max(max(applied_at[i]) for _, i in complete) - started
    p99 = latencies_ms[min(len(latencies_ms) - 1, int(0.99 * len(latencies_ms)))]
    print(f"3 nodes, {num_commands} label commands, concurrency {concurrency}, via {label}")
    print(f"  applied on all 3 nodes: {len(complete)}/{num_commands}")
    print(f"  throughput: {len(complete) / elapsed:.0f} events/s committed and applied everywhere")
    print(
        f"  latency submit -> applied on all 3: p50 {statistics.median(latencies_ms):.1f} ms, "
        f"p99 {p99:.1f} ms, max {latencies_ms[-1]:.1f} ms",
        flush=True,
    )


async def run(num_commands: int, concurrency: int, via: str, root: Path) -> None:
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
        master = NodeId(nodes[0].state()["master"])
        applied_at: dict[int, list[float]] = {}
        readies = [asyncio.Event() for _ in nodes]
        watchers = [asyncio.create_task(watch(n, applied_at, r)) for n, r in zip(nodes, readies, strict=True)]
        await asyncio.gather(*(r.wait() for r in readies))
        if via in ("http", "both"):
            async with httpx.AsyncClient(timeout=30.0) as client:
                await measure(
                    "HTTP (round-robin over the nodes' APIs)",
                    http_submitter(client, nodes, target),
                    applied_at,
                    num_commands,
                    concurrency,
                )
        if via in ("transport", "both"):
            transport = await open_transport(cluster, nodes)
            try:
                submit, tasks = await transport_submitter(transport, master, target)
                await measure(
                    "the transport (straight to the master)", submit, applied_at, num_commands, concurrency
                )
                for task in tasks:
                    task.cancel()
            finally:
                await transport.close()
        for task in watchers:
            task.cancel()
    finally:
        cluster.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--via", choices=("http", "transport", "both"), default="both")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as root:
        anyio.run(run, args.commands, args.concurrency, args.via, Path(root))


if __name__ == "__main__":
    main()

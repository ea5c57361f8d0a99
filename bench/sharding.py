"""Sharding benchmark, pipeline part: decode speed of one model on 1 node vs a 2-node pipeline, through real
`shoal node` processes on loopback (the same /generate path a user takes).

For each placement: greedy requests with `ignore_eos`, and decode tok/s = (tokens - 1) / (time of the last
delta - time of the first delta), the median over `--requests` runs; prefill is left out by starting at
the first token. Prints both and their ratio (the issue's target: 2-node pipeline >= 0.9x one node).
Runners get `--runner-threads` threads each.

    .venv/bin/python bench/sharding.py --model default --tokens 64 --requests 3

(Not yet here: the tensor-parallel half of the issue's benchmark, a ~1B-shape model on 2 pinned ranks.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from shoal.local_cluster import LocalCluster, LocalNode


def decode_tok_s(node: LocalNode, instance_id: str, model: str, tokens: int) -> float:
    body = {
        "model": model,
        "instance_id": instance_id,
        "prompt": "Once upon a time",
        "temperature": 0.0,
        "max_tokens": tokens,
        "ignore_eos": True,
    }
    stamps: list[float] = []
    counts: list[int] = []
    with httpx.stream("POST", f"{node.api_url}/generate", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            item = json.loads(line)
            if item["type"] == "error":
                raise RuntimeError(item["message"])
            if item["type"] == "delta":
                stamps.append(time.perf_counter())
                counts.append(len(item["token_ids"]))
    return (sum(counts) - counts[0]) / (stamps[-1] - stamps[0])


def wait_ready(cluster: LocalCluster, node: LocalNode, instance_id: str) -> None:
    def ready() -> bool:
        runners = node.get(f"/instances/{instance_id}")["runners"]
        if any(status["kind"] == "runner_failed" for status in runners.values()):
            raise RuntimeError(f"a runner failed: {runners}")
        return bool(runners) and all(status["kind"] == "runner_ready" for status in runners.values())

    cluster.wait_until(ready, 300, f"instance {instance_id}", interval=0.5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--runner-threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        cluster = LocalCluster(Path(root), cluster="bench-sharding", node_timeout_s=5.0)
        try:
            nodes = cluster.add(2, extra=("--runner-threads", str(args.runner_threads)))
            cluster.wait_until(lambda: all(n.get("/health") for n in nodes), 60, "node APIs")
            cluster.wait_until(
                lambda: sum(r["status"] == "active" for r in nodes[0].state()["nodes"].values()) == 2,
                30,
                "members",
            )
            results: dict[str, float] = {}
            placements = {
                "1 node": {"node_ids": [nodes[0].node_id()]},
                "2-node pipeline": {"sharding": "pipeline", "min_nodes": 2},
            }
            for name, request in placements.items():
                placed = httpx.post(
                    f"{nodes[0].api_url}/instances", json={"model": args.model, **request}, timeout=60
                )
                placed.raise_for_status()
                instance_id = placed.json()["instance_id"]
                wait_ready(cluster, nodes[0], instance_id)
                decode_tok_s(nodes[0], instance_id, args.model, 8)  # warm-up
                runs = [
                    decode_tok_s(nodes[0], instance_id, args.model, args.tokens) for _ in range(args.requests)
                ]
                results[name] = statistics.median(runs)
                print(
                    f"{name:>16}: {results[name]:7.1f} decode tok/s (runs: {', '.join(f'{r:.1f}' for r in runs)})"
                )
                httpx.delete(f"{nodes[0].api_url}/instances/{instance_id}", timeout=30).raise_for_status()
                time.sleep(2)  # let its runners exit before the next placement loads
            ratio = results["2-node pipeline"] / results["1 node"]
            print(f"2-node pipeline / 1 node: {ratio:.2f}x (target >= 0.9x)")
        finally:
            cluster.stop_all()


if __name__ == "__main__":
    main()

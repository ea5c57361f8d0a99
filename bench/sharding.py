"""Sharding benchmark: decode tok/s of pipeline and tensor parallelism on loopback.

Pipeline part: one model on 1 node vs a 2-node pipeline, through real `shoal node` processes on loopback
(the same /generate path a user takes).

For each placement: greedy requests with `ignore_eos`, and decode tok/s = (tokens - 1) / (time of the last
delta - time of the first delta), the median over `--requests` runs; prefill is left out by starting at
the first token. Both placements are loaded at once and take turns, request by request. Prints both and
their ratio (the issue's target: 2-node pipeline >= 0.9x one node).
Runners get `--runner-threads` threads each.

Tensor part (bench/sharding_tensor.py): a ~1B-shape random-weight Llama (hidden 2048, 16 layers, 32/8
heads, MLP 5632, vocabulary 32000; written once as bf16 safetensors, run in `--tp-dtype`) on 1 rank pinned
to one core vs 2 tensor-parallel ranks pinned to one core each, through runner processes under a
RunnerSupervisor (not nodes: see that module), same decode tok/s measure. Target: >= 1.5x.

    .venv/bin/python bench/sharding.py                 # both parts, ~10 minutes on 2 cores
    .venv/bin/python bench/sharding.py --short         # both parts, fewer tokens: a few minutes
    .venv/bin/python bench/sharding.py --part tensor --tp-model-dir /tmp/llama-1b   # keeps the model
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from sharding_tensor import run_tensor_bench  # bench/ is on sys.path when this runs as a script
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


def run_pipeline_bench(model: str, tokens: int, requests: int, runner_threads: int) -> dict[str, float]:
    """Both placements stay loaded and take turns request by request (as the tensor half does), so a change
    in the machine's speed (other tenants of a shared host) hits them alike; the ratio is given of the
    medians and as the median of back-to-back pairs."""
    with tempfile.TemporaryDirectory() as root:
        # compiled one-stream decode, as a node has by default
        cluster = LocalCluster(Path(root), cluster="bench-sharding", node_timeout_s=5.0, compile_decode=True)
        try:
            nodes = cluster.add(2, extra=("--runner-threads", str(runner_threads)))
            cluster.wait_until(lambda: all(n.get("/health") for n in nodes), 60, "node APIs")
            cluster.wait_until(
                lambda: sum(r["status"] == "active" for r in nodes[0].state()["nodes"].values()) == 2,
                30,
                "members",
            )
            single, pipeline = "1 node", "2-node pipeline"
            placements = {
                single: {"node_ids": [nodes[0].node_id()]},
                pipeline: {"sharding": "pipeline", "min_nodes": 2},
            }
            instances: dict[str, str] = {}
            for name, request in placements.items():
                placed = httpx.post(
                    f"{nodes[0].api_url}/instances", json={"model": model, **request}, timeout=60
                )
                placed.raise_for_status()
                instances[name] = placed.json()["instance_id"]
                wait_ready(cluster, nodes[0], instances[name])
                decode_tok_s(nodes[0], instances[name], model, 8)  # warm-up
            runs: dict[str, list[float]] = {name: [] for name in placements}
            for _ in range(requests):
                for name, instance_id in instances.items():
                    runs[name].append(decode_tok_s(nodes[0], instance_id, model, tokens))
            results = {name: statistics.median(values) for name, values in runs.items()}
            for name, values in runs.items():
                print(
                    f"{name:>24}: {results[name]:7.2f} decode tok/s (runs: {', '.join(f'{r:.2f}' for r in values)})"
                )
            pairs = [p / s for s, p in zip(runs[single], runs[pipeline], strict=True)]
            print(
                f"2-node pipeline / 1 node: {results[pipeline] / results[single]:.2f}x of the medians, "
                f"{statistics.median(pairs):.2f}x the median of back-to-back pairs (target >= 0.9x)"
            )
            return results
        finally:
            cluster.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("both", "pipeline", "tensor"), default="both")
    parser.add_argument("--short", action="store_true", help="fewer tokens and runs (a few minutes)")
    parser.add_argument("--model", default="default", help="pipeline part: the model to place")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--runner-threads", type=int, default=1)
    parser.add_argument("--tp-tokens", type=int, default=32)
    parser.add_argument("--tp-requests", type=int, default=3)
    parser.add_argument("--tp-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--tp-quant", choices=("none", "int8", "int4", "auto"), default="none")
    parser.add_argument("--tp-cores", default="0,1", help="the two cores the ranks are pinned to")
    parser.add_argument(
        "--tp-model-dir", type=Path, help="where the ~1B model is written once and kept (default: a temp dir)"
    )
    args = parser.parse_args()
    if args.short:
        args.tokens, args.requests, args.tp_tokens, args.tp_requests = 24, 2, 12, 2
    if args.part in ("both", "pipeline"):
        print(f"pipeline: model {args.model}, {args.tokens} tokens, {args.runner_threads} runner thread(s)")
        run_pipeline_bench(args.model, args.tokens, args.requests, args.runner_threads)
    if args.part in ("both", "tensor"):
        first, second = (int(c) for c in args.tp_cores.split(","))
        print(f"tensor: ~1B random Llama, {args.tp_dtype}, quant {args.tp_quant}, {args.tp_tokens} tokens")
        with tempfile.TemporaryDirectory() as root:
            run_tensor_bench(
                args.tp_model_dir or Path(root) / "llama-1b",
                tokens=args.tp_tokens,
                requests=args.tp_requests,
                dtype=args.tp_dtype,
                quant=args.tp_quant,
                cores=(first, second),
            )


if __name__ == "__main__":
    main()

"""API overhead benchmark: decode tok/s and time to first token through the OpenAI HTTP API of a real node
vs the engine alone in this process, same prompts, same model, dtype, weight quantization and threads.

- Engine alone: `load_engine` on the embedded SmolLM2 as the placed instance's runner loads it (dtype,
  `quantize_model` quant, KV budget and context window, `--threads` torch threads). TTFT = add_request
  -> first token; decode tok/s = (tokens - first step's tokens) / (last token - first token).
- OpenAI API: one `shoal node` on loopback (`LocalCluster`, `--runner-threads --threads`), the embedded
  model placed, streamed chat completions through the official `openai` client. TTFT = request sent ->
  first content delta; decode tok/s = (completion tokens - 1) / (last delta - first delta). The node's
  TTFT metric (service open -> first token chunk), read around each request, splits the API's TTFT into
  HTTP (client, uvicorn, the OpenAI layer) and the rest (routing, the runner, prefill).
- /generate (diagnosis only): the node's NDJSON route, the same path without the OpenAI layer.

Same chats (the model's template), greedy, `ignore_eos`; every prompt starts with its own number so none
hits a prefix cache. The paths take turns prompt by prompt (the engine idles while the node works and the
other way round), so load that comes and goes on a shared machine falls on all of them. Prints medians
and the issue's targets: API decode >= 0.95x the engine's, API TTFT at most 15 ms above it.

    .venv/bin/python bench/api.py                    # 64 tokens, 8 prompts
    .venv/bin/python bench/api.py --tokens 32 --prompts 4
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import psutil
import torch
from openai.types.chat import ChatCompletionMessageParam

from shoal.engine.embedded import embedded_model_path
from shoal.engine.llm_engine import load_engine
from shoal.engine.model_runner import ModelRunner
from shoal.engine.sampling import SamplingParams
from shoal.engine.tokenizer import default_cache_dir
from shoal.local_cluster import LocalCluster, LocalNode
from shoal.master.shard_memory import stage_kv_bytes
from shoal.runner.spec import RunnerSpec, compute_dtype
from shoal.types.instances import ModelCard

TOPICS = (
    "Explain how a bicycle stays upright while moving.",
    "Write a short story about a lighthouse keeper and a lost whale.",
    "What are the main differences between rivers and canals? Describe how each is used for transport, "
    "irrigation and leisure, and give examples from three different continents.",
    "Describe the water cycle to a ten year old child.",
    "List some ideas for a rainy Sunday afternoon at home with friends, and explain why each one is fun, "
    "what it costs, and how long it takes to prepare.",
    "Why do cats purr?",
)


@dataclass(frozen=True)
class Timing:
    ttft_s: float
    decode_tok_s: float
    num_tokens: int
    node_cpu_s: float = 0.0  # CPU time the node process (not its runner) spent on the request
    model_cpu_s: float = 0.0  # CPU time of the process running the model (this one or the runner)
    http_ttft_s: float | None = None  # the part of the TTFT outside the node's generation service


Chat = list[dict[str, str]]
Run = Callable[[Chat], Timing]


def engine_run(tokens: int, threads: int, instance: dict[str, Any]) -> Run:
    """The engine in this process, loaded as the instance's runner loads it: dtype, quant, KV budget and
    context window (sized from that budget as the worker sizes it), torch threads."""
    card = ModelCard.model_validate(instance["card"])
    (shard,) = instance["shards"]
    kv_cache_bytes = shard["kv_cache_bytes"]
    tokens_held = kv_cache_bytes // stage_kv_bytes(card, card.num_layers, 1)
    block_size = RunnerSpec.model_fields["block_size"].default
    quant = instance["quant"]
    torch.set_num_threads(threads)
    engine = load_engine(
        embedded_model_path(),
        dtype=getattr(torch, compute_dtype(card.dtype, quant)),
        kv_cache_bytes=kv_cache_bytes,
        max_model_len=min(card.context_length, tokens_held - tokens_held % block_size),
        tokenizer_cache_dir=default_cache_dir(),
        threads=None,  # as a runner: torch's thread count, set above
        quant=quant,
    )
    assert isinstance(engine.runner, ModelRunner)  # load_engine builds one
    if engine.quantization is not None:
        print(f"engine: {engine.quantization.describe()}")
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    request_ids = itertools.count()

    def run(chat: Chat) -> Timing:
        started = time.perf_counter()
        engine.add_request(f"bench-{next(request_ids)}", chat, params)
        stamps: list[float] = []
        counts: list[int] = []
        while engine.has_unfinished():
            for output in engine.step():
                if output.token_ids:
                    stamps.append(time.perf_counter())
                    counts.append(len(output.token_ids))
        return Timing(stamps[0] - started, (sum(counts) - counts[0]) / (stamps[-1] - stamps[0]), sum(counts))

    return run


def ttft_sum_s(node: LocalNode) -> float:
    """The node's own TTFT histogram sum for the OpenAI API (service open -> first token chunk)."""
    text = httpx.get(f"{node.api_url}/metrics", timeout=10).text
    prefix = "shoal_time_to_first_token_seconds_sum{"
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix) and 'api="openai"' in line
    )


def api_run(client: openai.OpenAI, node: LocalNode, tokens: int) -> Run:
    """The OpenAI API, streamed chat completions through the official client. The node's TTFT metric
    read around each request tells the HTTP side (client, uvicorn, the OpenAI layer) from the rest."""

    def run(chat: Chat) -> Timing:
        node_ttft_before = ttft_sum_s(node)
        started = time.perf_counter()
        first: float | None = None
        last = started
        completion_tokens = 0
        stream = client.chat.completions.create(
            model="default",
            messages=cast("list[ChatCompletionMessageParam]", chat),
            temperature=0,
            max_tokens=tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                completion_tokens = chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.delta.content and first is None:
                first = now
            if choice.delta.content or choice.finish_reason:
                last = now
        if first is None or completion_tokens < 2:
            raise RuntimeError(f"the API streamed no tokens ({completion_tokens} completion tokens)")
        service_ttft_s = ttft_sum_s(node) - node_ttft_before
        return Timing(
            first - started,
            (completion_tokens - 1) / (last - first),
            completion_tokens,
            http_ttft_s=first - started - service_ttft_s,
        )

    return run


def generate_run(node: LocalNode, tokens: int) -> Run:
    """The node's own NDJSON /generate: what the runner and router cost without the OpenAI layer, to tell
    the two apart."""

    def run(chat: Chat) -> Timing:
        body = {
            "model": "default",
            "messages": chat,
            "temperature": 0,
            "max_tokens": tokens,
            "ignore_eos": True,
        }
        started = time.perf_counter()
        stamps: list[float] = []
        counts: list[int] = []
        with httpx.stream("POST", f"{node.api_url}/generate", json=body, timeout=300) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                item = json.loads(line)
                if item["type"] == "error":
                    raise RuntimeError(item["message"])
                if item["type"] == "delta" and item["token_ids"]:
                    stamps.append(time.perf_counter())
                    counts.append(len(item["token_ids"]))
        return Timing(stamps[0] - started, (sum(counts) - counts[0]) / (stamps[-1] - stamps[0]), sum(counts))

    return run


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def interleaved(runs: dict[str, Run], num_prompts: int, node: psutil.Process) -> dict[str, list[Timing]]:
    """Each prompt through every path in turn (rotating who goes first), so load that comes and goes on
    the machine falls on all of them alike. /generate gets its own variant of each prompt: it shares the
    node's prefix cache with the API. CPU times per request (the node process's: what the HTTP layers
    cost; the model's: this process for the engine, the runner for the node) hold whatever the load."""
    (runner,) = node.children()
    own = psutil.Process()
    results: dict[str, list[Timing]] = {name: [] for name in runs}
    for run in runs.values():
        run([{"role": "user", "content": "Hello"}])  # warm-up
    names = list(runs)
    for index in range(num_prompts):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            variant = " (again)" if name == "/generate" else ""
            chat = [{"role": "user", "content": f"Request {index}{variant}. {TOPICS[index % len(TOPICS)]}"}]
            model = own if name == "engine alone" else runner
            node_before, model_before = _cpu_s(node), _cpu_s(model)
            timing = runs[name](chat)
            node_cpu_s, model_cpu_s = _cpu_s(node) - node_before, _cpu_s(model) - model_before
            results[name].append(dataclasses.replace(timing, node_cpu_s=node_cpu_s, model_cpu_s=model_cpu_s))
    return results


def start_node(root: Path, threads: int) -> tuple[LocalCluster, LocalNode, dict[str, Any]]:
    cluster = LocalCluster(root, cluster="bench-api")
    (node,) = cluster.add(1, extra=("--runner-threads", str(threads)))
    cluster.wait_until(lambda: node.get("/health"), 60, "the node's API")
    cluster.wait_until(
        lambda: (
            node.state()["master"] is not None
            and any(record["status"] == "active" for record in node.state()["nodes"].values())
        ),
        60,
        "the node to elect itself master",
    )
    placed = httpx.post(f"{node.api_url}/instances", json={"model": "default"}, timeout=60)
    if placed.status_code != 201:
        raise RuntimeError(f"placing the model failed: {placed.status_code} {placed.text}")
    instance_id = placed.json()["instance_id"]

    def ready() -> dict[str, Any] | None:
        instance: dict[str, Any] = node.get(f"/instances/{instance_id}")
        kinds = {status["kind"] for status in instance["runners"].values()}
        if "runner_failed" in kinds:
            raise RuntimeError(f"a runner failed: {instance['runners']}")
        return instance if kinds == {"runner_ready"} else None

    instance = cluster.wait_until(ready, 300, f"instance {instance_id} ready", interval=0.5)
    return cluster, node, instance


def summary(name: str, timings: list[Timing]) -> tuple[float, float]:
    ttft = statistics.median(t.ttft_s for t in timings)
    decode = statistics.median(t.decode_tok_s for t in timings)
    runs = ", ".join(f"{t.decode_tok_s:.1f}" for t in timings)
    num_tokens = sum(t.num_tokens for t in timings)
    node_cpu = sum(t.node_cpu_s for t in timings) / num_tokens
    model_cpu = sum(t.model_cpu_s for t in timings) / num_tokens
    print(
        f"{name:>12}: decode {decode:6.1f} tok/s (runs: {runs}); TTFT median {ttft * 1000:6.1f} ms; "
        f"CPU per token: model {model_cpu * 1000:.1f} ms, node {node_cpu * 1000:.2f} ms"
    )
    return ttft, decode


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer (default 64)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts, each run every way (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine and the runner")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        cluster, node, instance = start_node(Path(root), args.threads)
        try:
            print(
                f"model: embedded SmolLM2, "
                f"{compute_dtype(instance['card']['dtype'], instance['quant'])} compute, quant {instance['quant']}, "
                f"{args.threads} thread(s), {args.tokens} tokens"
            )
            with openai.OpenAI(
                base_url=f"{node.api_url}/v1", api_key="none", max_retries=0, timeout=300
            ) as client:
                runs = {
                    "engine alone": engine_run(args.tokens, args.threads, instance),
                    "OpenAI API": api_run(client, node, args.tokens),
                    "/generate": generate_run(node, args.tokens),
                }
                assert node.process is not None
                results = interleaved(runs, args.prompts, psutil.Process(node.process.pid))
        finally:
            cluster.stop_all()
    engine, api = results["engine alone"], results["OpenAI API"]
    engine_ttft, engine_decode = summary("engine alone", engine)
    api_ttft, api_decode = summary("OpenAI API", api)
    summary("/generate", results["/generate"])  # for diagnosis: the node's path without the OpenAI layer
    # Pairs ran back to back on the same prompt: their ratio is the least disturbed by the machine's load.
    paired_decode = statistics.median(
        a.decode_tok_s / e.decode_tok_s for a, e in zip(api, engine, strict=True)
    )
    paired_ttft = statistics.median(a.ttft_s - e.ttft_s for a, e in zip(api, engine, strict=True))
    print(
        f"decode: API / engine = {api_decode / engine_decode:.3f}x of medians, {paired_decode:.3f}x median "
        "of pairs (target >= 0.95x)"
    )
    print(
        f"TTFT: API - engine = {(api_ttft - engine_ttft) * 1000:+.1f} ms of medians, {paired_ttft * 1000:+.1f} ms "
        "median of pairs (target <= 15 ms)"
    )
    http_ttft = statistics.median(t.http_ttft_s for t in api if t.http_ttft_s is not None)
    print(
        f"      of which HTTP (client, uvicorn, OpenAI layer: the API's TTFT less the node's own TTFT "
        f"metric): {http_ttft * 1000:.1f} ms median"
    )


if __name__ == "__main__":
    main()

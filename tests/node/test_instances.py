"""Instances on real `shoal node` processes on loopback: placement, sharded generation, failures."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shoal.engine.sampling import SamplingParams
from shoal.local_cluster import LocalCluster
from tests.node.instance_helpers import (
    generate,
    place,
    runner_processes,
    tokens,
    wait_gone,
    wait_members,
    wait_ready,
)
from tests.runner.harness import reference
from tests.runner.tiny_model_dir import write_tiny_model_dir

PROMPT = "the quick brown fox"
GREEDY = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def expected(tiny: Path) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return list(reference(tiny, [PROMPT], params)[0].token_ids)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("pair"), cluster="instances", node_timeout_s=3.0)
    try:
        cluster.add(2, extra=("--runner-threads", "1"))
        wait_members(cluster, 2)
        yield cluster
    finally:
        cluster.stop_all()


def _delete(cluster: LocalCluster, instance_id: str) -> None:
    node = cluster.nodes[0]
    response = httpx.delete(f"{node.api_url}/instances/{instance_id}", timeout=10)
    assert response.status_code == 200, response.text
    wait_gone(cluster, node, instance_id, 5.0)

    def runners_gone() -> bool:  # a worker forgets a runner once its process has exited and been reaped
        local = [n.state()["diagnostics"]["worker"]["runners"] for n in cluster.nodes]
        return not any(runner_id.startswith(instance_id) for runners in local for runner_id in runners)

    cluster.wait_until(runners_gone, 20.0, f"the runners of {instance_id} to exit")


@pytest.mark.parametrize("sharding", ["pipeline", "tensor"])
def test_two_node_instance_gives_the_greedy_tokens_of_one_process(
    pair: LocalCluster, tiny: Path, expected: list[int], sharding: str
) -> None:
    n0, n1 = pair.nodes
    # unquantized: the reference is an fp32 process (TP ranks would quantize their own slices)
    response = place(n0, model=str(tiny), sharding=sharding, min_nodes=2, quant="none")
    assert response.status_code == 201, response.text
    instance = response.json()
    assert instance["sharding"] == sharding and len(instance["shards"]) == 2
    assert {s["node_id"] for s in instance["shards"]} == {n0.node_id(), n1.node_id()}
    # Before its runners are ready the model answers 503 with Retry-After, at once (asked of n1 once the
    # placement has reached it: the master answered 201 on n0, and n1 learns of it a moment later).
    pair.wait_until(lambda: instance["instance_id"] in n1.state()["instances"], 5.0, "n1 to see the instance")
    early = httpx.post(f"{n1.api_url}/generate", json={"model": "tiny-llama", "prompt": PROMPT}, timeout=5)
    assert early.status_code == 503 and early.headers["Retry-After"], early.text
    wait_ready(pair, n1, instance["instance_id"])
    index_before = n0.state()["last_index"]
    for node in (n0, n1):  # the request may arrive at either node
        status, lines = generate(node, model="tiny-llama", prompt=PROMPT, **GREEDY)
        assert status == 200, lines
        assert tokens(lines) == expected
        assert [line["type"] for line in lines[-2:]] == ["finish", "end"]
        assert lines[-2]["usage"]["completion_tokens"] == len(expected)
    # Requests do not write events (no Running churn in the log): only profile updates may have come.
    new = [e for e in _events(n0, index_before + 1) if e["event"]["kind"] != "node_profile_updated"]
    assert new == []
    _delete(pair, instance["instance_id"])


def _events(node: Any, first: int) -> list[dict[str, Any]]:
    last = node.state()["last_index"]
    if last < first:
        return []
    with httpx.stream("GET", f"{node.api_url}/events", params={"from_index": first}, timeout=5) as response:
        events = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["index"] >= last:
                    break
        return events


def test_impossible_placements_are_refused_and_create_nothing(pair: LocalCluster, tmp_path: Path) -> None:
    n0, _ = pair.nodes
    odd = write_tiny_model_dir(
        tmp_path / "odd-heads", hidden_size=96, num_attention_heads=3, num_key_value_heads=1
    )
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"model": "default", "kv_headroom_tokens": 10**9, "min_nodes": 1}, 409, "needs"),
        ({"model": str(odd), "sharding": "tensor", "min_nodes": 2}, 409, "divisible by world size 2"),
        ({"model": "default", "backend": "nccl"}, 409, "nccl"),
        ({"model": "default", "node_ids": ["no-such-node"]}, 409, "no-such-node"),
        ({"model": "no-such-model"}, 404, "unknown model"),
        ({"model": "~shoal-no-such-user/model"}, 404, "unknown model"),  # a ~user with no home here
        ({"model": "default", "min_nodes": 0}, 422, "min_nodes"),
    ]
    for body, status, words in cases:
        response = place(n0, **body)
        assert response.status_code == status, (body, response.text)
        assert words in response.json()["error"]["message"], (body, response.text)
    assert n0.get("/instances")["instances"] == []
    assert n0.state()["instances"] == {}
    # What could be placed instead: previews with per-node memory, and the models this node has.
    found = n0.get("/instances/previews?model=default", timeout=30)["previews"]
    unknown = httpx.get(f"{n0.api_url}/instances/previews", params={"model": "~shoal-no-such-user"})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "model_not_found", unknown.text
    assert {(p["sharding"], len(p["memory"])) for p in found} >= {("pipeline", 1), ("pipeline", 2)}
    assert all(use["weight_bytes"] > 0 and use["free_bytes"] > 0 for p in found for use in p["memory"])
    models = n0.get("/models")["models"]
    assert [(m["id"], m["embedded"], m["instances"]) for m in models] == [("SmolLM2-135M-Instruct", True, [])]
    # A model with no instance at all: 404 at once; bad requests are refused before any routing.
    status, lines = generate(n0, model="tiny-llama", prompt=PROMPT)
    assert status == 404 and lines[0]["error"]["type"] == "model_not_found"
    bad_requests: list[tuple[dict[str, Any], int, str]] = [
        ({"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
        ({"prompt": PROMPT, "messages": [{"role": "user", "content": "x"}]}, 400, "exactly one"),
        ({"prompt": []}, 400, "empty"),
        ({"prompt": PROMPT, "max_tokens": "many"}, 422, "max_tokens"),
    ]
    for body, status, words in bad_requests:
        status_got, lines = generate(n0, model="tiny-llama", **body)
        assert status_got == status and words in lines[0]["error"]["message"], (body, lines)


def test_killed_runner_errors_its_request_and_a_new_placement_serves(pair: LocalCluster, tiny: Path) -> None:
    n0, n1 = pair.nodes
    response = place(n0, model=str(tiny), node_ids=[n0.node_id()])
    assert response.status_code == 201, response.text
    instance_id = response.json()["instance_id"]
    wait_ready(pair, n1, instance_id)
    [runner] = runner_processes(n0)
    # A client that leaves mid-stream cancels its task on the runner, which goes back to Ready.
    body = {
        "model": "tiny-llama",
        "prompt": PROMPT,
        "temperature": 0.0,
        "max_tokens": 230,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{n1.api_url}/generate", json=body, timeout=30) as answer:
        assert json.loads(next(answer.iter_lines()))["type"] == "delta"

    def cancelled() -> bool:
        worker = n0.state()["diagnostics"]["worker"]
        statuses = [status["kind"] for status in worker["runners"].values()]
        return worker["tasks_cancelled"] == 1 and statuses == ["runner_ready"]

    pair.wait_until(cancelled, 5.0, "the task cancelled on its runner")
    seen: dict[str, Any] = {}
    first_delta = threading.Event()

    def stream() -> None:
        body = {
            "model": "tiny-llama",
            "prompt": PROMPT,
            "temperature": 0.0,
            "max_tokens": 230,
            "ignore_eos": True,
        }
        with httpx.stream("POST", f"{n1.api_url}/generate", json=body, timeout=30) as answer:
            for line in answer.iter_lines():
                item = json.loads(line)
                if item["type"] == "delta":
                    first_delta.set()
                elif item["type"] in ("error", "finish"):
                    seen[item["type"]] = (item, time.monotonic())

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_delta.wait(30), "no first chunk"
    runner.kill()
    killed_at = time.monotonic()
    reader.join(10)
    assert "finish" not in seen, seen
    error, at = seen["error"]
    assert at - killed_at < 2.0
    assert "SIGKILL" in error["message"]
    gone_after = wait_gone(pair, n0, instance_id, 10.0)
    print(f"runner SIGKILL: error after {at - killed_at:.3f} s, instance gone {gone_after:.3f} s later")
    # the next placement of the model serves the next request
    again = place(n1, model=str(tiny), node_ids=[n1.node_id()])
    assert again.status_code == 201, again.text
    wait_ready(pair, n0, again.json()["instance_id"])
    status, lines = generate(n0, model="tiny-llama", prompt=PROMPT, **GREEDY)
    assert status == 200 and lines[-2]["type"] == "finish", lines
    _delete(pair, again.json()["instance_id"])


def test_embedded_model_as_a_two_node_pipeline_answers_like_one_node(pair: LocalCluster) -> None:
    n0, n1 = pair.nodes
    single = place(n0, model="default", node_ids=[n1.node_id()], quant="none")
    split = place(n0, model="default", sharding="pipeline", min_nodes=2, quant="none")
    assert single.status_code == 201 and split.status_code == 201, (single.text, split.text)
    for response in (single, split):
        wait_ready(pair, n0, response.json()["instance_id"])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    texts = []
    for response in (single, split):
        pinned = response.json()["instance_id"]
        status, lines = generate(
            n0, model="default", instance_id=pinned, messages=messages, temperature=0.0, max_tokens=12
        )
        assert status == 200 and lines[-2]["type"] == "finish", lines
        texts.append("".join(line["text"] for line in lines if line["type"] == "delta"))
    assert texts[0] == texts[1] and "Paris" in texts[0]
    for response in (single, split):
        _delete(pair, response.json()["instance_id"])


def test_three_node_pipeline_then_a_killed_node_errors_its_request(
    pair: LocalCluster, tiny: Path, expected: list[int]
) -> None:
    """Last in this module: it adds a third node to the pair and kills one node."""
    pair.add(1, extra=("--runner-threads", "1"))
    wait_members(pair, 3)
    response = place(pair.nodes[0], model=str(tiny), sharding="pipeline", min_nodes=3)
    assert response.status_code == 201, response.text
    instance = response.json()
    assert [s["layer_end"] - s["layer_start"] for s in instance["shards"]] == [1, 1, 1]
    wait_ready(pair, pair.nodes[0], instance["instance_id"])
    status, lines = generate(pair.nodes[2], model="tiny-llama", prompt=PROMPT, **GREEDY)
    assert status == 200 and tokens(lines) == expected, lines
    # SIGKILL a node of the instance that is neither the master nor the one holding the request.
    master = pair.nodes[0].state()["master"]
    by_id = {node.node_id(): node for node in pair.nodes}
    holder = by_id[master]
    victim = next(by_id[s["node_id"]] for s in instance["shards"] if s["node_id"] != master)
    seen: dict[str, Any] = {}
    first_delta = threading.Event()

    def stream() -> None:
        body = {
            "model": "tiny-llama",
            "prompt": PROMPT,
            "temperature": 0.0,
            "max_tokens": 230,
            "ignore_eos": True,
        }
        with httpx.stream("POST", f"{holder.api_url}/generate", json=body, timeout=30) as answer:
            for line in answer.iter_lines():
                item = json.loads(line)
                if item["type"] == "delta":
                    first_delta.set()
                elif item["type"] in ("error", "finish"):
                    seen[item["type"]] = (item, time.monotonic())

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_delta.wait(30), "no first chunk"
    victim.kill()
    killed_at = time.monotonic()
    reader.join(15)
    assert "finish" not in seen, seen
    _, at = seen["error"]
    assert at - killed_at < pair.node_timeout_s + 2.0
    gone_after = wait_gone(pair, holder, instance["instance_id"], pair.node_timeout_s + 5.0)
    print(f"node SIGKILL: error after {at - killed_at:.3f} s, instance gone {gone_after:.3f} s later")
    # The survivors' runners of the instance stop too.
    survivors = [node for node in pair.nodes if node is not victim]
    pair.wait_until(
        lambda: not any(runner_processes(node) for node in survivors), 20.0, "sibling runners to stop"
    )

"""Helpers for tests that place instances on real `shoal node` processes and generate through them."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import psutil

from shoal.local_cluster import LocalCluster, LocalNode

STARTUP_S = 60.0  # process start (imports) on a loaded 2-core machine
READY_S = 90.0  # runner processes import torch, join their group, load and warm up


def wait_members(cluster: LocalCluster, num: int) -> None:
    nodes = cluster.nodes
    cluster.wait_until(lambda: all(node.get("/health") for node in nodes), STARTUP_S, "node APIs")

    def joined() -> bool:
        state = nodes[0].state()
        active = [r for r in state["nodes"].values() if r["status"] == "active"]
        return state["master"] is not None and len(active) == num

    cluster.wait_until(joined, 30.0, f"{num} members")


def place(node: LocalNode, **body: Any) -> httpx.Response:
    return httpx.post(f"{node.api_url}/instances", json=body, timeout=30)


def wait_ready(cluster: LocalCluster, node: LocalNode, instance_id: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        instance: dict[str, Any] = node.get(f"/instances/{instance_id}")
        kinds = [status["kind"] for status in instance["runners"].values()]
        if "runner_failed" in kinds:
            raise AssertionError(f"a runner failed: {instance['runners']}")
        return instance if len(kinds) == len(instance["shards"]) and set(kinds) == {"runner_ready"} else None

    result: dict[str, Any] = cluster.wait_until(ready, READY_S, f"instance {instance_id} ready", interval=0.2)
    return result


def generate(node: LocalNode, timeout: float = 60.0, **body: Any) -> tuple[int, list[dict[str, Any]]]:
    """Status and the NDJSON lines of a /generate call."""
    with httpx.stream("POST", f"{node.api_url}/generate", json=body, timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, [response.json()]
        return 200, [json.loads(line) for line in response.iter_lines() if line]


def tokens(lines: list[dict[str, Any]]) -> list[int]:
    return [t for line in lines if line["type"] == "delta" for t in line["token_ids"]]


def runner_processes(node: LocalNode) -> list[psutil.Process]:
    assert node.process is not None
    runners = []
    for child in psutil.Process(node.process.pid).children(recursive=True):
        try:
            if "shoal.runner" in " ".join(child.cmdline()):
                runners.append(child)
        except psutil.Error:  # exited (a zombie until its node reaps it) or gone: not running
            continue
    return runners


def wait_gone(cluster: LocalCluster, node: LocalNode, instance_id: str, timeout: float) -> float:
    started = time.monotonic()
    cluster.wait_until(
        lambda: instance_id not in node.state()["instances"], timeout, f"{instance_id} deleted"
    )
    return time.monotonic() - started

"""The control API of a real `shoal node` process: answers and error shapes as an HTTP client sees them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shoal.local_cluster import LocalCluster, LocalNode

STARTUP_S = 60.0  # process start (imports) on a loaded 2-core machine


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalNode, LocalNode]]:
    """A node that is its own master, and one that has no master for its first ~minute (a 10 s heartbeat
    means it listens, then settles, for tens of seconds): both started at once."""
    root = tmp_path_factory.mktemp("api")
    serving = LocalCluster(root / "serving", cluster="api", heartbeat_interval_s=0.25)
    masterless = LocalCluster(root / "masterless", cluster="api-slow", heartbeat_interval_s=10.0)
    try:
        (node,) = serving.add(1)
        (alone,) = masterless.add(1)
        for cluster, member in ((serving, node), (masterless, alone)):
            cluster.wait_until(lambda m=member: m.get("/health"), STARTUP_S, "node API")
        serving.wait_until(lambda: node.state()["nodes"], 10.0, "the node to join itself")
        yield node, alone
    finally:
        serving.stop_all()
        masterless.stop_all()


def post_label(node: LocalNode, target: str, body: Any) -> httpx.Response:
    return httpx.post(f"{node.api_url}/nodes/{target}/labels", json=body, timeout=15)


def test_no_master_within_the_deadline_is_503(nodes: tuple[LocalNode, LocalNode]) -> None:
    _, alone = nodes
    assert alone.get("/health")["master"] is None
    started = time.monotonic()
    response = post_label(alone, alone.node_id(), {"key": "zone", "value": "eu"})
    waited = time.monotonic() - started
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == "no_master" and "within 5 s" in error["message"]
    assert 5.0 <= waited < 9.0
    assert alone.state()["diagnostics"]["commands_timed_out"] == 1


def test_invalid_bodies_are_422_and_rejections_409(nodes: tuple[LocalNode, LocalNode]) -> None:
    node, _ = nodes
    node_id = node.node_id()
    for body in ({"key": "bad key!", "value": "x"}, {"key": "zone"}, ["not", "an", "object"]):
        response = post_label(node, node_id, body)
        assert response.status_code == 422, body
        error = response.json()["error"]
        assert error["type"] == "invalid_request" and error["message"], body
    unknown = post_label(node, "no-such-node", {"key": "zone", "value": "eu"})
    assert unknown.status_code == 409
    rejected = unknown.json()["error"]
    assert rejected["type"] == "command_rejected" and "unknown node 'no-such-node'" in rejected["message"]
    assert rejected["command_id"]
    missing = httpx.delete(f"{node.api_url}/nodes/{node_id}/labels/nothing-here", timeout=15)
    assert missing.status_code == 409 and "has no label 'nothing-here'" in missing.json()["error"]["message"]


def test_events_replay_from_an_index_then_go_live(nodes: tuple[LocalNode, LocalNode]) -> None:
    node, _ = nodes
    node_id = node.node_id()
    last = node.state()["last_index"]
    assert last >= 2
    seen: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{node.api_url}/events", params={"from_index": 2}, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        while not seen or seen[-1]["index"] < last:
            line = next(lines)
            if line.startswith("data: "):
                seen.append(json.loads(line[len("data: ") :]))
        accepted = post_label(node, node_id, {"key": "live", "value": "1"})
        assert accepted.status_code == 200
        first, last_of_command = accepted.json()["first_index"], accepted.json()["last_index"]
        while seen[-1]["index"] < last_of_command:
            line = next(lines)
            if line.startswith("data: "):
                seen.append(json.loads(line[len("data: ") :]))
    indices = [e["index"] for e in seen]
    assert indices[0] == 2 and indices == list(range(2, indices[-1] + 1))
    labelled = next(e for e in seen if e["index"] == first)
    assert labelled["event"] == {"kind": "node_label_set", "node_id": node_id, "key": "live", "value": "1"}
    assert labelled["command_id"]
    bad = httpx.get(f"{node.api_url}/events", params={"from_index": 0}, timeout=5)
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_request"


def test_nodes_lists_members_with_profiles_and_labels(nodes: tuple[LocalNode, LocalNode]) -> None:
    node, _ = nodes
    node_id = node.node_id()
    assert post_label(node, node_id, {"key": "rack", "value": "r1"}).status_code == 200
    (listed,) = node.get("/nodes")["nodes"]
    assert listed["node_id"] == node_id and listed["status"] == "active"
    assert listed["labels"]["rack"] == "r1"
    assert listed["profile"]["api_address"] == {"host": "127.0.0.1", "port": node.api_port}
    assert listed["profile"]["memory_total_bytes"] > 0

"""A runner killed while it streams, as an API client sees it: an OpenAI stream gets an error event and
then `[DONE]` within 2 s, and nothing hangs. Its own node and a tiny random model, so the shared `served`
node keeps its runner. (The framing of the other APIs' error events is tested on plain chunks.)"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shoal.local_cluster import LocalCluster, LocalNode
from tests.node.instance_helpers import place, runner_processes, wait_members, wait_ready
from tests.runner.tiny_model_dir import write_tiny_model_dir


@pytest.fixture(scope="module")
def lone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, LocalNode, str]]:
    root = tmp_path_factory.mktemp("killed")
    model = str(write_tiny_model_dir(root / "tiny-llama"))
    cluster = LocalCluster(root / "cluster", cluster="killed")
    try:
        (node,) = cluster.add(1, extra=("--offline",))
        wait_members(cluster, 1)
        yield cluster, node, model
    finally:
        cluster.stop_all()


def _serve(cluster: LocalCluster, node: LocalNode, model: str) -> None:
    response = place(node, model=model, quant="none")
    assert response.status_code == 201, response.text
    wait_ready(cluster, node, response.json()["instance_id"])


def _kill_mid_stream(node: LocalNode, url: str, body: dict[str, Any]) -> tuple[list[str], float, float]:
    """The stream's lines, when the runner was killed (after the first content), and when the stream ended."""
    lines: list[str] = []
    first = threading.Event()
    ended: list[float] = []

    def read() -> None:
        with httpx.stream("POST", url, json=body, timeout=30) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                lines.append(line)
                if '"text"' in line:
                    first.set()
        ended.append(time.monotonic())

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(30), f"no first content: {lines}"
    [runner] = runner_processes(node)
    runner.kill()
    killed_at = time.monotonic()
    reader.join(15)
    assert ended, "the stream did not end"
    return lines, killed_at, ended[0]


def test_openai_stream_gets_an_error_event_then_done(lone: tuple[LocalCluster, LocalNode, str]) -> None:
    cluster, node, model = lone
    _serve(cluster, node, model)
    body = {"model": model, "prompt": "abc", "max_tokens": 400, "ignore_eos": True, "stream": True}
    lines, killed_at, ended_at = _kill_mid_stream(node, f"{node.api_url}/v1/completions", body)
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and error["message"]
    assert ended_at - killed_at < 2.0

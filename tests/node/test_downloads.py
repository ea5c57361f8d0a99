"""A model downloaded from a (local stand-in for the) Hugging Face hub by a real node, then placed and served."""

from __future__ import annotations

from pathlib import Path

import httpx

from shoal.local_cluster import LocalCluster
from tests.node.instance_helpers import generate, place, wait_members, wait_ready
from tests.runner.tiny_model_dir import write_tiny_model_dir
from tests.worker.fake_hub import FakeHub


def test_downloaded_model_is_listed_placed_and_served(cluster: LocalCluster, tmp_path: Path) -> None:
    source = write_tiny_model_dir(tmp_path / "source")
    with FakeHub({"acme/tiny": source}) as hub:
        [node] = cluster.add(1, extra=("--runner-threads", "1", "--hub-endpoint", hub.url))
        wait_members(cluster, 1)
        response = httpx.post(f"{node.api_url}/models/download", json={"repo_id": "acme/tiny"}, timeout=10)
        assert response.status_code == 202, response.text
        download_id = response.json()["download_id"]

        def finished() -> dict[str, object] | None:
            view: dict[str, object] = node.get(f"/models/downloads/{download_id}")
            return view if view["status"] in ("done", "failed") else None

        view = cluster.wait_until(finished, 60.0, "the download")
    assert view["status"] == "done" and view["bytes_done"] == view["bytes_total"], view
    refused = httpx.post(f"{node.api_url}/models/download", json={"repo_id": "../x"}, timeout=10)
    assert refused.status_code == 409 and "not a hub repo id" in refused.json()["error"]["message"]
    listed = {m["id"]: m for m in node.get("/models")["models"]}
    assert "acme--tiny" in listed and listed["acme--tiny"]["local"]
    placed = place(node, model="acme--tiny")
    assert placed.status_code == 201, placed.text
    wait_ready(cluster, node, placed.json()["instance_id"])
    status, lines = generate(node, model="acme--tiny", prompt="hello", temperature=0.0, max_tokens=4)
    assert status == 200 and lines[-2]["type"] == "finish", lines

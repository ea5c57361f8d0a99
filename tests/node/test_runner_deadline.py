"""A runner stuck in a stage is failed at the stage's deadline, with the reason, and its instance goes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from shoal.local_cluster import LocalCluster
from shoal.runner.spec import STALL_STAGE_ENV
from tests.node.instance_helpers import place, wait_gone, wait_members
from tests.runner.tiny_model_dir import write_tiny_model_dir


def test_runner_stuck_in_loading_fails_at_its_deadline(cluster: LocalCluster, tmp_path: Path) -> None:
    model = write_tiny_model_dir(tmp_path / "tiny")
    # Test-only fault injection through the runner's environment (inherited from its node), never a request.
    [node] = cluster.add(
        1, extra=("--runner-threads", "1", "--runner-deadline", "loading=2"), env={STALL_STAGE_ENV: "loading"}
    )
    wait_members(cluster, 1)
    response = place(node, model=str(model))
    assert response.status_code == 201, response.text
    instance_id = response.json()["instance_id"]
    wait_gone(cluster, node, instance_id, 60.0)
    reason = ""
    with httpx.stream("GET", f"{node.api_url}/events", params={"from_index": 1}, timeout=5) as events:
        for line in events.iter_lines():
            if line.startswith("data: ") and '"instance_deleted"' in line:
                reason = json.loads(line[6:])["event"]["reason"]
                break
    assert "loading did not finish within its deadline of 2 s" in reason, reason

"""A live `shoal node` serving the embedded model (SmolLM2, one runner), shared by the public API tests,
started once per test session (a node plus its runner take ~15 s to come up on this machine)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from shoal.local_cluster import LocalCluster, LocalNode
from tests.node.instance_helpers import wait_members, wait_ready

API_KEY = "test-api-key"


@dataclass(frozen=True)
class Served:
    node: LocalNode
    instance_id: str
    api_key: str

    @property
    def url(self) -> str:
        return self.node.api_url

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One node with `--api-key`, the embedded model placed and ready (model name "default"); offline, so
    nothing a test asks for is fetched from a hub."""
    cluster = LocalCluster(tmp_path_factory.mktemp("served"), cluster="served")
    try:
        (node,) = cluster.add(1, api_key=API_KEY, extra=("--runner-threads", "1", "--offline"))
        wait_members(cluster, 1)
        response = httpx.post(
            f"{node.api_url}/instances",
            json={"model": "default"},
            headers=node.headers,
            timeout=30,
        )
        assert response.status_code == 201, response.text
        instance_id = response.json()["instance_id"]
        wait_ready(cluster, node, instance_id)
        yield Served(node, instance_id, API_KEY)
    finally:
        cluster.stop_all()

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.local_cluster import LocalCluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path, cluster="test", node_timeout_s=2.0, heartbeat_interval_s=0.25)
    try:
        yield local
    finally:
        local.stop_all()

"""What a `shoal node` is told to be: `NodeSettings` (built by the CLI from its flags and environment),
and the banner a starting node prints about them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shoal.net.config import TransportSettings
from shoal.types import NodeId
from shoal.worker.plan import DEFAULT_DEADLINES, StageDeadlines


@dataclass(frozen=True)
class NodeSettings:
    cluster_name: str
    cluster_key: bytes | None
    transport: TransportSettings
    data_dir: Path
    api_host: str
    api_port: int
    node_timeout_s: float
    heartbeat_interval_s: float
    force_master: bool
    command_timeout_s: float = 5.0
    profile_update_interval_s: float = 5.0
    runner_threads: int | None = None
    compile_decode: bool = True
    runner_deadlines: StageDeadlines = DEFAULT_DEADLINES
    first_chunk_timeout_s: float = 60.0
    hub_endpoint: str | None = None
    offline: bool = False
    api_key: str | None = None  # required by every API route but /health when set

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def liveness_s(self) -> float:
        """A peer whose heartbeats stop for this long no longer counts for the election."""
        return 4 * self.heartbeat_interval_s

    @property
    def tick_s(self) -> float:
        return min(0.1, self.heartbeat_interval_s / 2)

    @property
    def quiet_s(self) -> float:
        """How long a starting node listens (for a clashing id) before it sends its first frame."""
        return 2 * self.heartbeat_interval_s


def banner(settings: NodeSettings, node_id: NodeId, has_secret: bool) -> str:
    secrecy = (
        "cluster key set: traffic is sealed with a secret only members hold"
        if has_secret
        else "no --cluster-key: traffic is authenticated by the cluster name only, not secret"
    )
    transport = settings.transport
    discovery = "multicast scouting on" if transport.multicast_scouting else "multicast off"
    return (
        f"shoal node {node_id} in cluster {settings.cluster_name!r}\n"
        f"  {secrecy}\n"
        f"  listen {', '.join(transport.listen)}; peers {', '.join(transport.connect) or 'none'}; {discovery}\n"
        f"  api http://{settings.api_host}:{settings.api_port}; data {settings.data_dir}; "
        f"node timeout {settings.node_timeout_s:g} s; heartbeat {settings.heartbeat_interval_s:g} s"
        + ("; --force-master" if settings.force_master else "")
    )

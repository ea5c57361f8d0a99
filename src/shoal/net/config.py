"""Transport settings and the zenoh configuration built from them.

Production default (`TransportSettings.lan`): peer mode, listen on every interface, multicast scouting on so
nodes on one LAN find each other with no configuration, gossip on so peers learn each other's addresses,
plus any `--peer tcp/HOST:PORT` endpoints for joins across routed networks.

Tests and CI (`TransportSettings.loopback`): multicast scouting off and every listen and connect endpoint
on 127.0.0.1. Gossip stays on (three peers that only know one of them still form a full mesh) and cannot
leak: a peer only gossips the locators it listens on, and those are all loopback.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

import zenoh

DEFAULT_MULTICAST_ADDRESS = "224.0.0.224:7446"
_ENDPOINT = re.compile(r"^(tcp|udp|quic|tls)/(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    """(protocol, host, port) of a zenoh endpoint such as `tcp/192.168.1.5:7447` or `tcp/[::1]:7447`."""
    match = _ENDPOINT.match(endpoint)
    if match is None:
        raise ValueError(
            f"invalid endpoint {endpoint!r}: expected PROTOCOL/HOST:PORT, e.g. tcp/192.168.1.5:7447"
        )
    protocol, host, port = match.group(1), match.group(2).strip("[]"), int(match.group(3))
    if port > 65535:
        raise ValueError(f"invalid endpoint {endpoint!r}: port {port} is out of range")
    return protocol, host, port


def is_loopback_endpoint(endpoint: str) -> bool:
    _, host, _ = parse_endpoint(endpoint)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere


@dataclass(frozen=True)
class TransportSettings:
    """Everything the transport needs to join a cluster; built at the edge (CLI, tests), passed down."""

    cluster_name: str
    listen: tuple[str, ...]
    connect: tuple[str, ...] = ()
    multicast_scouting: bool = True
    multicast_interface: str = "auto"
    multicast_address: str = DEFAULT_MULTICAST_ADDRESS
    gossip_scouting: bool = True
    # Frames opened but not yet dispatched on the event loop; beyond this zenoh's threads drop (and count).
    max_pending_frames: int = 10_000
    # Sealed frames waiting for the sender thread; beyond this `publish` waits.
    max_outbox_frames: int = 10_000
    # Per subscription; a consumer that falls this far behind loses frames (counted) instead of stalling zenoh.
    subscription_buffer: int = 1_000

    def __post_init__(self) -> None:
        if not _CLUSTER_NAME.match(self.cluster_name):
            raise ValueError(
                f"invalid cluster name {self.cluster_name!r}: use 1-64 letters, digits, '_', '.' or '-'"
            )
        for endpoint in (*self.listen, *self.connect):
            parse_endpoint(endpoint)
        if min(self.max_pending_frames, self.subscription_buffer, self.max_outbox_frames) < 1:
            raise ValueError("max_pending_frames, max_outbox_frames and subscription_buffer must be positive")

    @classmethod
    def lan(
        cls,
        cluster_name: str,
        *,
        port: int = 0,
        peers: tuple[str, ...] = (),
        multicast_interface: str = "auto",
    ) -> TransportSettings:
        """The production default: every interface, multicast discovery on (port 0: any free port)."""
        return cls(
            cluster_name=cluster_name,
            listen=(f"tcp/[::]:{port}",),
            connect=peers,
            multicast_scouting=True,
            multicast_interface=multicast_interface,
        )

    @classmethod
    def loopback(cls, cluster_name: str, *, port: int, peers: tuple[str, ...] = ()) -> TransportSettings:
        """For tests and CI: nothing leaves 127.0.0.1 (no multicast, loopback endpoints only)."""
        settings = cls(
            cluster_name=cluster_name,
            listen=(f"tcp/127.0.0.1:{port}",),
            connect=peers,
            multicast_scouting=False,
        )
        if not settings.is_loopback_only():
            raise ValueError(f"loopback settings got a non-loopback peer in {peers}")
        return settings

    def is_loopback_only(self) -> bool:
        """True when nothing this transport does can reach a real network interface."""
        return not self.multicast_scouting and all(
            is_loopback_endpoint(endpoint) for endpoint in (*self.listen, *self.connect)
        )

    def zenoh_config_dict(self) -> dict[str, Any]:
        return {
            "mode": "peer",
            "listen": {"endpoints": list(self.listen)},
            # Retry unreachable peers quickly (zenoh's default backs off to 4 s): a peer restarted after a
            # crash should be back in the mesh well within the cluster's failover budget.
            "connect": {
                "endpoints": list(self.connect),
                "retry": {"period_init_ms": 250, "period_max_ms": 2000, "period_increase_factor": 2},
            },
            "scouting": {
                "multicast": {
                    "enabled": self.multicast_scouting,
                    "interface": self.multicast_interface,
                    "address": self.multicast_address,
                },
                "gossip": {"enabled": self.gossip_scouting},
            },
        }

    def zenoh_config(self) -> zenoh.Config:
        """The zenoh configuration (zenoh validates every key; a typo is an error here, not a silent default)."""
        return zenoh.Config.from_json5(json.dumps(self.zenoh_config_dict()))

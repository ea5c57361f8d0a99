"""Link round-trip times to peers, measured by Ping/Pong over the cluster transport."""

from __future__ import annotations

from collections.abc import Iterable

from shoal.types import NodeId, Ping, Pong

SMOOTHING = 0.3  # weight of a new sample in the moving average


class LinkProber:
    def __init__(self, node_id: NodeId) -> None:
        self.node_id = node_id
        self._next_id = 0
        self._outstanding: dict[int, NodeId] = {}
        self._rtts_ms: dict[NodeId, float] = {}

    def ping(self, peer: NodeId, now: float) -> Ping:
        ping_id = self._next_id
        self._next_id += 1
        self._outstanding[ping_id] = peer
        if len(self._outstanding) > 1_000:  # peers that never answer: forget the oldest probes
            for stale in sorted(self._outstanding)[:500]:
                del self._outstanding[stale]
        return Ping(node_id=self.node_id, ping_id=ping_id, sent_at=now)

    def on_pong(self, pong: Pong, now: float) -> None:
        if self._outstanding.pop(pong.ping_id, None) != pong.node_id:
            return  # not a probe we sent to that node
        sample = max(0.0, (now - pong.sent_at) * 1000.0)
        old = self._rtts_ms.get(pong.node_id)
        self._rtts_ms[pong.node_id] = sample if old is None else (1 - SMOOTHING) * old + SMOOTHING * sample

    def rtts_ms(self, live: Iterable[NodeId] | None = None) -> dict[NodeId, float]:
        """Smoothed RTT per peer (only the `live` ones when given), rounded to 0.01 ms."""
        keep = None if live is None else set(live)
        return {
            peer: round(rtt, 2) for peer, rtt in sorted(self._rtts_ms.items()) if keep is None or peer in keep
        }

"""Plain-data helpers for master tests."""

from __future__ import annotations

from typing import Any

from shoal.state import apply_all
from shoal.types import ApiAddress, IndexedEvent, MasterElected, NodeId, NodeJoined, NodeProfile, State


def make_profile(node_id: str, **changes: Any) -> NodeProfile:
    base = NodeProfile(
        node_id=NodeId(node_id),
        hostname=f"host-{node_id}",
        memory_total_bytes=16 << 30,
        memory_available_bytes=8 << 30,
        cpu_model="test cpu",
        num_cpu_cores=4,
        num_cpu_threads=8,
        disk_free_bytes=100 << 30,
        api_address=ApiAddress(host="127.0.0.1", port=8000),
        shoal_version="0.1.0",
        started_at=1.0,
    )
    return base.model_copy(update=changes)


def state_with_nodes(*node_ids: str) -> State:
    events = [IndexedEvent(index=1, term=1, timestamp=0.0, event=MasterElected(node_id=NodeId("m"), term=1))]
    for node_id in node_ids:
        event = NodeJoined(node_id=NodeId(node_id), profile=make_profile(node_id))
        events.append(IndexedEvent(index=len(events) + 1, term=1, timestamp=0.0, event=event))
    return apply_all(State(), events)

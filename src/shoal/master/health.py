"""Node membership from heartbeats, as pure decisions the master carries out.

- `membership_events`: a heartbeat from a node the state does not know (or knows as timed out) becomes
  NodeJoined; a changed profile becomes NodeProfileUpdated — at once when something structural changed
  (hostname, GPUs, API address, ...), otherwise only when a resource moved noticeably (links to new peers
  included) and at most once per `min_update_interval_s`, so the log does not grow with every heartbeat, nor
  churn while a cluster forms and every node measures its links one by one.
- `silent_nodes`: active nodes not heard from for longer than the node timeout.
"""

from __future__ import annotations

from collections.abc import Mapping

from shoal.types import Event, NodeId, NodeJoined, NodeProfile, NodeProfileUpdated, State

_MIB = 1024 * 1024
MEMORY_CHANGE_BYTES = 256 * _MIB
DISK_CHANGE_BYTES = 1024 * _MIB
RTT_CHANGE_RATIO = 0.5
RTT_CHANGE_MIN_MS = 2.0


def _structural(profile: NodeProfile) -> NodeProfile:
    """The profile with its fast-moving measurements blanked out."""
    gpus = tuple(gpu.model_copy(update={"memory_free_bytes": 0}) for gpu in profile.gpus)
    return profile.model_copy(
        update={
            "memory_available_bytes": 0,
            "disk_free_bytes": 0,
            "gpus": gpus,
            "link_rtts_ms": {},
        }
    )


def _rtt_moved(old: float | None, new: float) -> bool:
    if old is None:
        return True
    change = abs(new - old)
    return change >= RTT_CHANGE_MIN_MS and change >= RTT_CHANGE_RATIO * max(old, 1e-9)


def resources_moved(old: NodeProfile, new: NodeProfile) -> bool:
    """Whether a measured resource changed enough to be worth an event."""
    if abs(old.memory_available_bytes - new.memory_available_bytes) >= MEMORY_CHANGE_BYTES:
        return True
    if abs(old.disk_free_bytes - new.disk_free_bytes) >= DISK_CHANGE_BYTES:
        return True
    old_gpus = {gpu.index: gpu.memory_free_bytes for gpu in old.gpus}
    for gpu in new.gpus:
        if abs(old_gpus.get(gpu.index, 0) - gpu.memory_free_bytes) >= MEMORY_CHANGE_BYTES:
            return True
    return any(_rtt_moved(old.link_rtts_ms.get(peer), rtt) for peer, rtt in new.link_rtts_ms.items())


def membership_events(
    state: State, profile: NodeProfile, last_update_at: float | None, now: float, min_update_interval_s: float
) -> list[Event]:
    """Events a heartbeat carrying `profile` calls for. `last_update_at` is when the master last wrote a
    profile event for this node (None: not since it became master)."""
    record = state.nodes.get(profile.node_id)
    if record is None or record.status != "active":
        return [NodeJoined(node_id=profile.node_id, profile=profile)]
    if record.profile == profile:
        return []
    if _structural(record.profile) != _structural(profile):
        return [NodeProfileUpdated(node_id=profile.node_id, profile=profile)]
    due = last_update_at is None or now - last_update_at >= min_update_interval_s
    if due and resources_moved(record.profile, profile):
        return [NodeProfileUpdated(node_id=profile.node_id, profile=profile)]
    return []


def silent_nodes(
    state: State, last_heard: Mapping[NodeId, float], now: float, timeout_s: float
) -> list[NodeId]:
    """Active nodes whose last heartbeat is older than `timeout_s` (a node never heard counts as heard at
    whatever time the caller put in `last_heard` for it; absent nodes are not judged)."""
    return sorted(
        node_id
        for node_id in state.active_node_ids()
        if node_id in last_heard and now - last_heard[node_id] > timeout_s
    )

"""One line per applied event, for a person following a node's log."""

from __future__ import annotations

from shoal.types import (
    IndexedEvent,
    MasterElected,
    NodeJoined,
    NodeLabelRemoved,
    NodeLabelSet,
    NodeProfileUpdated,
    NodeTimedOut,
)
from shoal.types.instance_messages import InstanceCreated, InstanceDeleted, RunnerStatusChanged


def short(node_id: str) -> str:
    return node_id[:8] + "…" if len(node_id) > 8 else node_id


def describe_event(indexed: IndexedEvent) -> str:
    event = indexed.event
    head = f"event {indexed.index} {type(event).__name__}"
    if isinstance(event, MasterElected):
        return f"{head} node={short(event.node_id)} term={event.term}"
    if isinstance(event, NodeJoined | NodeProfileUpdated):
        profile = event.profile
        memory_gib = profile.memory_available_bytes / 2**30
        return (
            f"{head} node={short(event.node_id)} host={profile.hostname} "
            f"api={profile.api_address.host}:{profile.api_address.port} mem_free={memory_gib:.1f}GiB "
            f"gpus={len(profile.gpus)}"
        )
    if isinstance(event, NodeTimedOut):
        return f"{head} node={short(event.node_id)}"
    if isinstance(event, NodeLabelSet):
        return f"{head} node={short(event.node_id)} {event.key}={event.value}"
    if isinstance(event, NodeLabelRemoved):
        return f"{head} node={short(event.node_id)} key={event.key}"
    if isinstance(event, InstanceCreated):
        instance = event.instance
        shards = ", ".join(
            f"r{s.rank}@{short(s.node_id)}[{s.layer_start}:{s.layer_end}]" for s in instance.shards
        )
        return (
            f"{head} instance={instance.instance_id} model={instance.card.model_id} "
            f"{instance.sharding}/{instance.backend} shards={shards}"
        )
    if isinstance(event, InstanceDeleted):
        return f"{head} instance={event.instance_id} reason={event.reason}"
    if isinstance(event, RunnerStatusChanged):
        status = event.status.model_dump(exclude={"kind"})
        detail = " ".join(f"{key}={value}" for key, value in status.items())
        return (
            f"{head} runner={event.runner_id} {event.status.kind.removeprefix('runner_')} {detail}".rstrip()
        )
    return head

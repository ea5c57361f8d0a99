"""Placement: which nodes hold which shard of a model. Pure: plain data in, an instance or an error out.

`place(card, nodes, links, request, instance_id=...)` returns an `Instance`, or a `PlacementError` whose
reason says what is missing. `previews(card, nodes, links)` lists every feasible placement.

Rules
- Nodes: only active ones. `request.node_ids` names the exact set to use (each must exist and be active);
  otherwise placement picks, for each size, the nodes with the most free memory on the backend's device.
- Devices and memory: backend nccl puts each shard on the node's CUDA GPU with the most free memory and
  counts that GPU's free memory; gloo puts it on the CPU (or MPS on a Mac) and counts available RAM. One
  shard per node. A shard needs its weights + KV cache for the headroom tokens + a fixed runner
  overhead (see `shoal.master.shard_memory`), the weights counted as the request's `quant` holds them.
- Backend: nccl needs a CUDA GPU on every node of the instance; when it is asked for and nodes lack one,
  the answer is an error, never gloo. "auto" takes nccl when every chosen node has a GPU, else gloo.
- Pipeline: layers split in proportion to each node's free memory, every stage at least one layer and
  never more than fits; the first stage also holds the embedding, the last the final norm and LM head.
- Tensor: every rank holds every layer with 1/n of the heads and MLP columns; the attention heads, KV
  heads and MLP width must all divide by n.
- "auto" (the rule): the fewest nodes that fit, starting at `min_nodes` (one node whenever one fits);
  at each size nccl before gloo, then pipeline before tensor. Pipeline first because it moves one
  activation per stage per step where tensor does two all-reduces per layer, so it tolerates slow links;
  tensor is tried when pipeline cannot fit (tensor also splits the embedding and head).
- Rank order: the ring (rank 0 -> ... -> last -> rank 0, the way activations and sampled tokens travel)
  with the smallest sum of measured RTTs; ties (and clusters too large to search) keep the order of most
  free memory first, then node id. Rank 0's node hosts the rendezvous, on a port in RENDEZVOUS_PORT_BASE's
  range that no existing instance uses on that host: the first free one from a start drawn from the
  instance id. So a new instance does not take the port of one deleted a moment ago, whose rank 0 may
  still hold it while it shuts down (its bind would fail).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from shoal.master.shard_memory import (
    RUNNER_OVERHEAD_BYTES,
    fixed_weight_bytes,
    format_bytes,
    headroom_tokens,
    layer_bytes,
    stage_kv_bytes,
    stage_weight_bytes,
)
from shoal.types.ids import NodeId
from shoal.types.instance_ids import InstanceId, runner_id_for
from shoal.types.instances import (
    DEFAULT_WEIGHT_QUANT,
    CommBackend,
    GroupAddress,
    Instance,
    ModelCard,
    NodeMemoryUse,
    PlacementPreview,
    PlacementRequest,
    ShardAssignment,
    Sharding,
    WeightQuant,
)
from shoal.types.profiles import NodeProfile
from shoal.types.state import NodeRecord

Links = Mapping[NodeId, Mapping[NodeId, float]]
"""Round-trip times in milliseconds: links[a][b] as measured by node a."""

RENDEZVOUS_PORT_BASE = 29500
RENDEZVOUS_PORT_COUNT = 1000
UNKNOWN_RTT_MS = 100.0
"""RTT assumed for a link nobody has measured: worse than any LAN, so measured paths win."""
MAX_ORDER_SEARCH_NODES = 6
"""Up to this many nodes, every rank order is tried (720 orders); above it, free-memory order."""
MAX_PREVIEW_ALL_SUBSETS = 6
"""Up to this many active nodes, previews try every subset of them; above it, the best k for each k."""
PREVIEW_INSTANCE_ID = InstanceId("preview")
COMM_BACKENDS: tuple[CommBackend, ...] = ("gloo", "nccl")


@dataclass(frozen=True, slots=True)
class PlacementError:
    reason: str


@dataclass(frozen=True, slots=True)
class Slot:
    """A node as a place for one shard under one backend."""

    node_id: NodeId
    device: str
    free_bytes: int
    host: str


def place(
    card: ModelCard,
    nodes: Mapping[NodeId, NodeRecord],
    links: Links,
    request: PlacementRequest,
    *,
    instance_id: InstanceId,
    existing: Iterable[Instance] = (),
) -> Instance | PlacementError:
    placed = _place(card, nodes, links, request, instance_id, tuple(existing))
    return placed if isinstance(placed, PlacementError) else placed[0]


def previews(
    card: ModelCard,
    nodes: Mapping[NodeId, NodeRecord],
    links: Links,
    *,
    kv_headroom_tokens: int | None = None,
    quant: WeightQuant = DEFAULT_WEIGHT_QUANT,
    existing: Iterable[Instance] = (),
) -> list[PlacementPreview]:
    """Every feasible placement (for up to MAX_PREVIEW_ALL_SUBSETS active nodes; above, the nodes with
    most free memory for each count), fewest nodes first."""
    existing = tuple(existing)
    active = sorted(node_id for node_id, record in nodes.items() if record.status == "active")
    if len(active) <= MAX_PREVIEW_ALL_SUBSETS:
        subsets = [c for k in range(1, len(active) + 1) for c in itertools.combinations(active, k)]
    else:
        subsets = []
        for backend in COMM_BACKENDS:
            slots = _best_first([s for n in active if (s := make_slot(nodes[n].profile, backend))])
            subsets += [tuple(sorted(s.node_id for s in slots[:k])) for k in range(1, len(slots) + 1)]
        subsets = sorted(set(subsets), key=lambda subset: (len(subset), subset))
    found: list[PlacementPreview] = []
    for subset in subsets:
        shardings: tuple[Sharding, ...] = ("pipeline",) if len(subset) == 1 else ("pipeline", "tensor")
        for sharding in shardings:
            for backend in COMM_BACKENDS:
                request = PlacementRequest(
                    model_id=card.model_id,
                    sharding=sharding,
                    min_nodes=len(subset),
                    backend=backend,
                    node_ids=subset,
                    kv_headroom_tokens=kv_headroom_tokens,
                    quant=quant,
                )
                placed = _place(card, nodes, links, request, PREVIEW_INSTANCE_ID, existing)
                if not isinstance(placed, PlacementError):
                    found.append(_preview(request, *placed))
    return found


def make_slot(profile: NodeProfile, backend: CommBackend) -> Slot | None:
    """Where a shard of this backend would run on this node, or None when the node cannot run it."""
    host = reachable_host(profile)
    if backend == "nccl":
        if "cuda" not in profile.backends or not profile.gpus:
            return None
        gpu = max(profile.gpus, key=lambda gpu: (gpu.memory_free_bytes, -gpu.index))
        return Slot(profile.node_id, f"cuda:{gpu.index}", gpu.memory_free_bytes, host)
    device = "mps" if "mps" in profile.backends else "cpu"
    return Slot(profile.node_id, device, profile.memory_available_bytes, host)


def reachable_host(profile: NodeProfile) -> str:
    """The address other nodes reach this node at: its API host, unless that is a wildcard."""
    host = profile.api_address.host
    if host not in ("", "0.0.0.0", "::"):
        return host
    for interface in profile.network_interfaces:
        for address in interface.addresses:
            if not address.startswith(("127.", "::1", "fe80:")):
                return address
    return "127.0.0.1"


def links_from_nodes(nodes: Mapping[NodeId, NodeRecord]) -> dict[NodeId, dict[NodeId, float]]:
    """The RTTs each node reported in its profile."""
    return {node_id: dict(record.profile.link_rtts_ms) for node_id, record in nodes.items()}


def _place(
    card: ModelCard,
    nodes: Mapping[NodeId, NodeRecord],
    links: Links,
    request: PlacementRequest,
    instance_id: InstanceId,
    existing: tuple[Instance, ...],
) -> tuple[Instance, tuple[Slot, ...]] | PlacementError:
    if request.model_id != card.model_id:
        return PlacementError(
            f"the request is for model {request.model_id!r}, the card for {card.model_id!r}"
        )
    candidates = _candidates(nodes, request)
    if isinstance(candidates, PlacementError):
        return candidates
    tokens = headroom_tokens(card, request.kv_headroom_tokens)
    explicit = request.node_ids is not None
    sizes = [len(candidates)] if explicit else list(range(request.min_nodes, len(candidates) + 1))
    backends: tuple[CommBackend, ...] = ("nccl", "gloo") if request.backend == "auto" else (request.backend,)
    slots_by_backend = {
        backend: _best_first([s for r in candidates if (s := make_slot(r.profile, backend))])
        for backend in backends
    }
    if request.backend == "nccl":
        gpu_error = _nccl_error(candidates, slots_by_backend["nccl"], request)
        if gpu_error is not None:
            return gpu_error
    failures: list[str] = []  # of the largest size tried: the closest to fitting, so the most telling
    for size in sizes:
        size_failures: list[str] = []
        for backend in backends:
            slots = slots_by_backend[backend]
            if len(slots) < size or (explicit and len(slots) < len(candidates)):
                continue
            ordered = _ring_order(slots[:size], links)
            port = _free_port(ordered[0].host, existing, instance_id)
            if port is None:
                return PlacementError(f"no free rendezvous port left on {ordered[0].host}")
            rendezvous = GroupAddress(host=ordered[0].host, port=port)
            for sharding in _shardings(request, size):
                build = _build_pipeline if sharding == "pipeline" else _build_tensor
                built = build(card, ordered, tokens, instance_id, backend, rendezvous, request.quant)
                if isinstance(built, Instance):
                    return built, ordered
                size_failures.append(
                    f"{sharding} over {size} node{'s' if size > 1 else ''} ({backend}): {built}"
                )
        failures = size_failures or failures
    return PlacementError(f"cannot place {card.model_id}: " + "; ".join(failures or ["no node can run it"]))


def _candidates(
    nodes: Mapping[NodeId, NodeRecord], request: PlacementRequest
) -> list[NodeRecord] | PlacementError:
    if request.node_ids is None:
        active = [nodes[n] for n in sorted(nodes) if nodes[n].status == "active"]
        if len(active) < request.min_nodes:
            names = ", ".join(r.profile.node_id for r in active) or "none"
            return PlacementError(
                f"min_nodes is {request.min_nodes} but only {len(active)} node(s) are active ({names})"
            )
        return active
    unknown = [n for n in request.node_ids if n not in nodes]
    timed_out = [n for n in request.node_ids if n in nodes and nodes[n].status != "active"]
    problems = []
    if unknown:
        problems.append(f"unknown node(s): {', '.join(unknown)}")
    if timed_out:
        problems.append(f"node(s) timed out: {', '.join(timed_out)}")
    if problems:
        return PlacementError("cannot use the requested nodes: " + "; ".join(problems))
    return [nodes[n] for n in request.node_ids]


def _nccl_error(
    candidates: list[NodeRecord], gpu_slots: list[Slot], request: PlacementRequest
) -> PlacementError | None:
    with_gpu = {slot.node_id for slot in gpu_slots}
    without = ", ".join(r.profile.node_id for r in candidates if r.profile.node_id not in with_gpu)
    if request.node_ids is not None and without:
        return PlacementError(f"backend nccl needs a GPU on every node; nodes without: {without}")
    if len(gpu_slots) < request.min_nodes:
        return PlacementError(
            f"backend nccl needs a GPU on every node; {len(gpu_slots)} of {len(candidates)} active nodes "
            f"have one, min_nodes is {request.min_nodes} (nodes without: {without})"
        )
    return None


def _shardings(request: PlacementRequest, size: int) -> tuple[Sharding, ...]:
    if request.sharding != "auto":
        return (request.sharding,)
    return ("pipeline",) if size == 1 else ("pipeline", "tensor")


def _best_first(slots: list[Slot]) -> list[Slot]:
    return sorted(slots, key=lambda slot: (-slot.free_bytes, slot.node_id))


def _rtt(links: Links, a: NodeId, b: NodeId) -> float:
    measured = [rtt for rtt in (links.get(a, {}).get(b), links.get(b, {}).get(a)) if rtt is not None]
    return sum(measured) / len(measured) if measured else UNKNOWN_RTT_MS


def _ring_order(slots: list[Slot], links: Links) -> tuple[Slot, ...]:
    """`slots` come best-first; the first order with the least ring RTT wins, so ties keep that order."""
    if len(slots) <= 2 or len(slots) > MAX_ORDER_SEARCH_NODES:
        return tuple(slots)
    best, best_cost = tuple(slots), float("inf")
    for order in itertools.permutations(slots):
        cost = round(sum(_rtt(links, order[i - 1].node_id, order[i].node_id) for i in range(len(order))), 2)
        if cost < best_cost:
            best, best_cost = order, cost
    return best


def _free_port(host: str, existing: tuple[Instance, ...], instance_id: InstanceId) -> int | None:
    used = {i.rendezvous.port for i in existing if i.rendezvous.host == host}
    start = int.from_bytes(hashlib.sha256(instance_id.encode()).digest()[:4], "big") % RENDEZVOUS_PORT_COUNT
    ports = (RENDEZVOUS_PORT_BASE + (start + k) % RENDEZVOUS_PORT_COUNT for k in range(RENDEZVOUS_PORT_COUNT))
    return next((p for p in ports if p not in used), None)


def split_layers(num_layers: int, weights: Sequence[int], caps: Sequence[int]) -> list[int]:
    """`num_layers` split in proportion to `weights`, each part in [1, cap]. Needs
    len(weights) <= num_layers <= sum(caps) and every cap >= 1."""
    n = len(weights)
    assert n <= num_layers <= sum(caps) and min(caps) >= 1, (num_layers, weights, caps)
    total_weight = sum(weights)
    targets = [num_layers * w / total_weight if total_weight else num_layers / n for w in weights]
    parts = [min(max(int(t), 1), cap) for t, cap in zip(targets, caps, strict=True)]
    while sum(parts) < num_layers:
        i = max((i for i in range(n) if parts[i] < caps[i]), key=lambda i: (targets[i] - parts[i], -i))
        parts[i] += 1
    while sum(parts) > num_layers:
        i = max((i for i in range(n) if parts[i] > 1), key=lambda i: (parts[i] - targets[i], -i))
        parts[i] -= 1
    return parts


def _memory_summary(weights: int, kv: int, tokens: int, overhead: int) -> str:
    return (
        f"weights {format_bytes(weights)} + KV cache {format_bytes(kv)} for {tokens} tokens "
        f"+ runner overhead {format_bytes(overhead)}"
    )


def _build_pipeline(
    card: ModelCard,
    slots: tuple[Slot, ...],
    tokens: int,
    instance_id: InstanceId,
    backend: CommBackend,
    rendezvous: GroupAddress,
    quant: WeightQuant,
) -> Instance | str:
    n, num_layers = len(slots), card.num_layers
    if n > num_layers:
        return f"a pipeline over {n} nodes needs at least {n} layers; the model has {num_layers}"
    per_layer = layer_bytes(card, quant) + stage_kv_bytes(card, 1, tokens)
    fixed_weights = [fixed_weight_bytes(card, i == 0, i == n - 1, 1, quant) for i in range(n)]
    fixed = [f + RUNNER_OVERHEAD_BYTES for f in fixed_weights]
    free_total = sum(slot.free_bytes for slot in slots)
    weights = num_layers * layer_bytes(card, quant) + fixed_weights[0] + (fixed_weights[-1] if n > 1 else 0)
    kv = stage_kv_bytes(card, num_layers, tokens)
    needed = weights + kv + n * RUNNER_OVERHEAD_BYTES
    if needed > free_total:
        where = (
            f"node {slots[0].node_id} has {format_bytes(free_total)} free"
            if n == 1
            else f"the {n} nodes have {format_bytes(free_total)} free together"
        )
        summary = _memory_summary(weights, kv, tokens, n * RUNNER_OVERHEAD_BYTES)
        return f"needs {format_bytes(needed)} ({summary}), {where}"
    caps = [
        (slot.free_bytes - f) // per_layer if per_layer else num_layers
        for slot, f in zip(slots, fixed, strict=True)
    ]
    short = [
        f"{slot.node_id} has {format_bytes(slot.free_bytes)} free, its stage needs at least {format_bytes(f + per_layer)}"
        for slot, f, cap in zip(slots, fixed, caps, strict=True)
        if cap < 1
    ]
    if short:
        return "a node cannot hold even one layer: " + "; ".join(short)
    if sum(caps) < num_layers:
        return f"the nodes can hold {sum(caps)} of the {num_layers} layers between them, once each stage's fixed part is counted"
    parts = split_layers(num_layers, [slot.free_bytes for slot in slots], caps)
    shards, start = [], 0
    for rank, (slot, count) in enumerate(zip(slots, parts, strict=True)):
        end = start + count
        shards.append(
            ShardAssignment(
                node_id=slot.node_id,
                runner_id=runner_id_for(instance_id, rank),
                rank=rank,
                world_size=n,
                layer_start=start,
                layer_end=end,
                tp_rank=0,
                tp_size=1,
                device=slot.device,
                weight_bytes=stage_weight_bytes(card, start, end, 1, quant),
                kv_cache_bytes=stage_kv_bytes(card, count, tokens),
            )
        )
        start = end
    return Instance(
        instance_id=instance_id,
        card=card,
        sharding="pipeline",
        backend=backend,
        shards=tuple(shards),
        rendezvous=rendezvous,
        quant=quant,
    )


def _build_tensor(
    card: ModelCard,
    slots: tuple[Slot, ...],
    tokens: int,
    instance_id: InstanceId,
    backend: CommBackend,
    rendezvous: GroupAddress,
    quant: WeightQuant,
) -> Instance | str:
    n = len(slots)
    not_dividing = [
        f"{name} ({value})"
        for name, value in (
            ("num_heads", card.num_heads),
            ("num_kv_heads", card.num_kv_heads),
            ("intermediate_size", card.intermediate_size),
        )
        if value % n
    ]
    if not_dividing:
        return f"tensor parallel needs {', '.join(not_dividing)} divisible by world size {n}"
    weights = stage_weight_bytes(card, 0, card.num_layers, n, quant)
    kv = stage_kv_bytes(card, card.num_layers, tokens, n)
    needed = weights + kv + RUNNER_OVERHEAD_BYTES
    short = [
        f"{slot.node_id} has {format_bytes(slot.free_bytes)}" for slot in slots if slot.free_bytes < needed
    ]
    if short:
        summary = _memory_summary(weights, kv, tokens, RUNNER_OVERHEAD_BYTES)
        return f"needs {format_bytes(needed)} on each node ({summary}); short: {', '.join(short)} free"
    shards = tuple(
        ShardAssignment(
            node_id=slot.node_id,
            runner_id=runner_id_for(instance_id, rank),
            rank=rank,
            world_size=n,
            layer_start=0,
            layer_end=card.num_layers,
            tp_rank=rank,
            tp_size=n,
            device=slot.device,
            weight_bytes=weights,
            kv_cache_bytes=kv,
        )
        for rank, slot in enumerate(slots)
    )
    return Instance(
        instance_id=instance_id,
        card=card,
        sharding="tensor",
        backend=backend,
        shards=shards,
        rendezvous=rendezvous,
        quant=quant,
    )


def _preview(request: PlacementRequest, instance: Instance, slots: tuple[Slot, ...]) -> PlacementPreview:
    memory = tuple(
        NodeMemoryUse(
            node_id=shard.node_id,
            device=shard.device,
            rank=shard.rank,
            layer_start=shard.layer_start,
            layer_end=shard.layer_end,
            tp_size=shard.tp_size,
            weight_bytes=shard.weight_bytes,
            kv_cache_bytes=shard.kv_cache_bytes,
            overhead_bytes=RUNNER_OVERHEAD_BYTES,
            free_bytes=slot.free_bytes,
        )
        for shard, slot in zip(instance.shards, slots, strict=True)
    )
    return PlacementPreview(
        request=request, sharding=instance.sharding, backend=instance.backend, memory=memory
    )

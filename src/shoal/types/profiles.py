"""What a node reports about itself: hardware, free resources, addresses and links to other nodes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from shoal.types._base import FrozenModel
from shoal.types.ids import NodeIdField

Backend = Literal["cpu", "cuda", "mps"]
"""A compute backend a node can run an engine on."""

Bytes = Annotated[int, Field(ge=0)]
ShortText = Annotated[str, StringConstraints(max_length=256)]


class GpuInfo(FrozenModel):
    index: Annotated[int, Field(ge=0)]
    name: ShortText
    memory_total_bytes: Bytes
    memory_free_bytes: Bytes


class NetworkInterface(FrozenModel):
    name: ShortText
    addresses: tuple[ShortText, ...]


class ApiAddress(FrozenModel):
    host: ShortText
    port: Annotated[int, Field(ge=0, le=65535)]


class NodeProfile(FrozenModel):
    """A snapshot of one node. `link_rtts_ms` holds the round-trip times the node measured to its peers."""

    node_id: NodeIdField
    hostname: ShortText
    memory_total_bytes: Bytes
    memory_available_bytes: Bytes
    cpu_model: ShortText
    num_cpu_cores: Annotated[int, Field(ge=1)]
    num_cpu_threads: Annotated[int, Field(ge=1)]
    gpus: tuple[GpuInfo, ...] = ()
    backends: tuple[Backend, ...] = ("cpu",)
    disk_free_bytes: Bytes
    network_interfaces: tuple[NetworkInterface, ...] = ()
    api_address: ApiAddress
    shoal_version: ShortText
    started_at: float
    link_rtts_ms: dict[NodeIdField, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)

"""Gathers this node's NodeProfile. Static facts (host name, CPU, backends) are read once; the dynamic
ones (free memory, GPU memory, disk, addresses) on each `gather()`, which costs about a millisecond
without GPUs and reuses GPU readings for a few seconds with them (see `shoal.worker.gpus`)."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

import shoal
from shoal.types.ids import NodeId
from shoal.types.profiles import ApiAddress, Backend, GpuInfo, NetworkInterface, NodeProfile
from shoal.worker.gpus import GpuProbe, detect_gpu_probe

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class StaticFacts:
    hostname: str
    cpu_model: str
    num_cpu_cores: int
    num_cpu_threads: int
    backends: tuple[Backend, ...]


class ProfileGatherer:
    def __init__(
        self,
        node_id: NodeId,
        models_dir: Path,
        api_address: ApiAddress,
        started_at: float,
        *,
        gpu_probe: GpuProbe | None = None,
        cgroup_root: Path = CGROUP_ROOT,
    ) -> None:
        """`gpu_probe` defaults to `detect_gpu_probe()`; pass one to override discovery."""
        self.node_id = node_id
        self.models_dir = models_dir
        self.api_address = api_address
        self.started_at = started_at
        self._gpu_probe = gpu_probe if gpu_probe is not None else detect_gpu_probe()
        self._cgroup_root = cgroup_root
        gpus = self._gpu_probe.read() if self._gpu_probe is not None else ()
        self.static = StaticFacts(
            hostname=socket.gethostname()[:256],
            cpu_model=read_cpu_model()[:256],
            num_cpu_cores=count_cpu_cores(),
            num_cpu_threads=count_cpu_threads(),
            backends=detect_backends(has_nvidia_gpus=bool(gpus)),
        )

    def gather(self, link_rtts_ms: Mapping[NodeId, float] | None = None) -> NodeProfile:
        memory_total, memory_available = read_memory(self._cgroup_root)
        gpus: tuple[GpuInfo, ...] = self._gpu_probe.read() if self._gpu_probe is not None else ()
        return NodeProfile(
            node_id=self.node_id,
            hostname=self.static.hostname,
            memory_total_bytes=memory_total,
            memory_available_bytes=memory_available,
            cpu_model=self.static.cpu_model,
            num_cpu_cores=self.static.num_cpu_cores,
            num_cpu_threads=self.static.num_cpu_threads,
            gpus=gpus,
            backends=self.static.backends,
            disk_free_bytes=disk_free_bytes(self.models_dir),
            network_interfaces=read_network_interfaces(),
            api_address=self.api_address,
            shoal_version=shoal.__version__,
            started_at=self.started_at,
            link_rtts_ms=dict(link_rtts_ms or {}),
        )


def read_cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    model = _cpu_model_from_cpuinfo(cpuinfo)
    if model is None and sys.platform == "darwin":
        model = _cpu_model_from_sysctl()
    return model or platform.processor() or platform.machine() or "unknown"


def _cpu_model_from_cpuinfo(cpuinfo: Path) -> str | None:
    """Linux: x86 names the model in "model name"; some ARM kernels in "Model" or "Hardware"."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:  # not Linux
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
            return value.strip()
    return None


def _cpu_model_from_sysctl() -> str | None:
    try:
        result = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"],
            capture_output=True,
            text=True,
            timeout=2,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as error:
        log.debug("sysctl gave no CPU model: %s", error)
        return None
    return result.stdout.strip() or None


def count_cpu_threads() -> int:
    """Logical CPUs this process may run on (its affinity mask, which containers narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, psutil.cpu_count(logical=True) or 1)


def count_cpu_cores() -> int:
    physical = psutil.cpu_count(logical=False) or psutil.cpu_count(logical=True) or 1
    return max(1, min(physical, count_cpu_threads()))


def detect_backends(*, has_nvidia_gpus: bool) -> tuple[Backend, ...]:
    """ "cpu" always; "cuda" when there are NVIDIA GPUs and the installed torch can use them; "mps" on a
    Mac whose torch supports it. torch is imported only in those two cases (it is slow to import)."""
    backends: list[Backend] = ["cpu"]
    if has_nvidia_gpus or sys.platform == "darwin":
        try:
            import torch

            if has_nvidia_gpus and torch.cuda.is_available():
                backends.append("cuda")
            if sys.platform == "darwin" and torch.backends.mps.is_available():
                backends.append("mps")
        except (ImportError, RuntimeError, AssertionError, OSError) as error:  # a broken torch: cpu only
            log.warning("torch could not check accelerators, reporting cpu only: %s", error)
    return tuple(backends)


def read_memory(cgroup_root: Path = CGROUP_ROOT) -> tuple[int, int]:
    """(total, available) bytes: the machine's, narrowed by a cgroup v2 memory limit when one is set."""
    memory = psutil.virtual_memory()
    total, available = int(memory.total), int(memory.available)
    limit = _read_int(cgroup_root / "memory.max")
    if limit is not None and limit < total:
        used = _read_int(cgroup_root / "memory.current") or 0
        total, available = limit, max(0, min(available, limit - used))
    return total, available


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):  # absent, or "max" (no limit)
        return None


def disk_free_bytes(models_dir: Path) -> int:
    """Free bytes on the file system that holds (or will hold) `models_dir`."""
    path = models_dir.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return int(shutil.disk_usage(path).free)
    except OSError as error:
        log.warning("cannot read free disk space at %s: %s", path, error)
        return 0


def read_network_interfaces() -> tuple[NetworkInterface, ...]:
    interfaces = []
    for name, addresses in sorted(psutil.net_if_addrs().items()):
        ips = tuple(
            address.address.split("%", 1)[0][:256]
            for address in addresses
            if address.family in (socket.AF_INET, socket.AF_INET6)
        )
        if ips:
            interfaces.append(NetworkInterface(name=name[:256], addresses=ips))
    return tuple(interfaces)

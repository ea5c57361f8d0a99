"""GPU discovery for the node profile. Never raises and never blocks for long: a machine without GPUs,
without drivers or with a broken `nvidia-smi` reports no GPUs (and logs why once)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Protocol

from shoal.types.profiles import GpuInfo

log = logging.getLogger(__name__)

NVIDIA_SMI_QUERY = ("--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits")
MIB = 2**20


class GpuProbe(Protocol):
    def read(self) -> tuple[GpuInfo, ...]: ...


def parse_nvidia_smi(output: str) -> tuple[GpuInfo, ...]:
    """Rows of `index, name, memory.total [MiB], memory.free [MiB]`; rows that don't parse are skipped."""
    gpus = []
    for line in output.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 4:
            continue
        index, name, total_mib, free_mib = fields
        try:
            gpus.append(
                GpuInfo(
                    index=int(index),
                    name=name[:256],
                    memory_total_bytes=int(float(total_mib) * MIB),
                    memory_free_bytes=int(float(free_mib) * MIB),
                )
            )
        except ValueError:  # "[N/A]" fields on some boards; pydantic's ValidationError is a ValueError too
            log.debug("skipping nvidia-smi row %r", line)
    return tuple(gpus)


class NvidiaSmiProbe:
    """Runs `nvidia-smi` (tens of milliseconds), at most once per `refresh_s`; between runs it returns the
    last reading. Failures log once and read as no GPUs."""

    def __init__(self, executable: str, *, timeout_s: float = 3.0, refresh_s: float = 5.0) -> None:
        self._executable = executable
        self._timeout_s = timeout_s
        self._refresh_s = refresh_s
        self._last: tuple[GpuInfo, ...] = ()
        self._read_at: float | None = None
        self._warned = False

    def read(self) -> tuple[GpuInfo, ...]:
        now = time.monotonic()
        if self._read_at is not None and now - self._read_at < self._refresh_s:
            return self._last
        self._read_at = now
        try:
            result = subprocess.run(
                [self._executable, *NVIDIA_SMI_QUERY],
                capture_output=True,
                text=True,
                timeout=self._timeout_s,
                check=True,
            )
        except (OSError, subprocess.SubprocessError) as error:
            if not self._warned:
                log.warning("nvidia-smi failed, reporting no GPUs: %s", error)
                self._warned = True
            self._last = ()
            return self._last
        self._last = parse_nvidia_smi(result.stdout)
        return self._last


class TorchCudaProbe:
    """For machines with NVIDIA drivers but no nvidia-smi. Asking torch for free memory creates a CUDA
    context in this process, so this is only the fallback."""

    def read(self) -> tuple[GpuInfo, ...]:
        try:
            import torch

            gpus = []
            for index in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(index)
                name = torch.cuda.get_device_name(index)
                gpus.append(GpuInfo(index=index, name=name, memory_total_bytes=total, memory_free_bytes=free))
            return tuple(gpus)
        except (ImportError, RuntimeError, AssertionError, OSError) as error:  # driver/runtime mismatch
            log.warning("torch could not read CUDA devices, reporting no GPUs: %s", error)
            return ()


def detect_gpu_probe(nvidia_driver_dir: Path = Path("/proc/driver/nvidia")) -> GpuProbe | None:
    """The cheapest way to read this machine's GPUs, or None when it has no NVIDIA driver."""
    executable = shutil.which("nvidia-smi")
    if executable is not None:
        return NvidiaSmiProbe(executable)
    if nvidia_driver_dir.exists():
        return TorchCudaProbe()
    return None

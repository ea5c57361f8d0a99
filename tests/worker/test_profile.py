"""Node profile gathering on this machine, the nvidia-smi probe against stand-in executables, and the
pure parsers."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import psutil
import pytest

import shoal
from shoal.types import ApiAddress, GpuInfo, NodeId, NodeProfile
from shoal.worker.gpus import NvidiaSmiProbe, detect_gpu_probe, parse_nvidia_smi
from shoal.worker.profile import ProfileGatherer, read_cpu_model, read_memory

NODE = NodeId("node-a")
API = ApiAddress(host="127.0.0.1", port=52415)


class FixedGpus:
    def __init__(self, gpus: tuple[GpuInfo, ...]) -> None:
        self.gpus = gpus
        self.num_reads = 0

    def read(self) -> tuple[GpuInfo, ...]:
        self.num_reads += 1
        return self.gpus


def test_profile_of_this_machine(tmp_path: Path) -> None:
    models_dir = tmp_path / "models" / "not-yet-created"
    gatherer = ProfileGatherer(NODE, models_dir, API, started_at=123.5)
    profile = gatherer.gather({NodeId("node-b"): 0.8})
    assert NodeProfile.model_validate_json(profile.model_dump_json()) == profile
    assert profile.node_id == NODE
    assert 0 < profile.memory_total_bytes <= psutil.virtual_memory().total
    assert 0 < profile.memory_available_bytes <= profile.memory_total_bytes
    assert 1 <= profile.num_cpu_cores <= profile.num_cpu_threads <= (os.cpu_count() or 1)
    assert profile.cpu_model
    assert profile.backends[0] == "cpu"
    assert profile.disk_free_bytes > 0  # measured on the nearest existing parent of models_dir
    assert not models_dir.exists()  # gathering creates nothing
    loopback = {interface.name: interface.addresses for interface in profile.network_interfaces}
    assert any("127.0.0.1" in addresses for addresses in loopback.values())
    assert profile.api_address == API
    assert profile.shoal_version == shoal.__version__
    assert profile.started_at == 123.5
    assert profile.link_rtts_ms == {NodeId("node-b"): 0.8}


def test_gather_is_cheap(tmp_path: Path) -> None:
    gatherer = ProfileGatherer(NODE, tmp_path, API, started_at=0.0, gpu_probe=FixedGpus(()))
    start = time.perf_counter()
    for _ in range(50):
        gatherer.gather()
    assert (time.perf_counter() - start) / 50 < 0.05


def test_gpus_come_from_the_probe(tmp_path: Path) -> None:
    gpu = GpuInfo(index=0, name="Test GPU", memory_total_bytes=8 * 2**30, memory_free_bytes=7 * 2**30)
    probe = FixedGpus((gpu,))
    gatherer = ProfileGatherer(NODE, tmp_path, API, started_at=0.0, gpu_probe=probe)
    assert gatherer.gather().gpus == (gpu,)
    # GPUs alone don't make a "cuda" backend: the installed torch must be able to use them (a CPU build here)
    assert gatherer.static.backends == (("cpu", "cuda") if torch_has_cuda() else ("cpu",))
    probe.gpus = (gpu.model_copy(update={"memory_free_bytes": 2**30}),)
    assert gatherer.gather().gpus[0].memory_free_bytes == 2**30  # dynamic: read on every gather


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_parse_nvidia_smi() -> None:
    output = "0, NVIDIA H100 80GB HBM3, 81559, 80991\n1, NVIDIA H100 80GB HBM3, 81559, [N/A]\n\ngarbage\n"
    assert parse_nvidia_smi(output) == (
        GpuInfo(
            index=0,
            name="NVIDIA H100 80GB HBM3",
            memory_total_bytes=81559 * 2**20,
            memory_free_bytes=80991 * 2**20,
        ),
    )
    assert parse_nvidia_smi("") == ()


def _executable(path: Path, script: str) -> str:
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_nvidia_smi_probe_reads_and_caches(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    smi = _executable(tmp_path / "nvidia-smi", f'echo x >> {counter}\necho "0, Test GPU, 1024, 512"\n')
    probe = NvidiaSmiProbe(smi, refresh_s=60.0)
    expected = (GpuInfo(index=0, name="Test GPU", memory_total_bytes=2**30, memory_free_bytes=2**29),)
    assert probe.read() == expected
    assert probe.read() == expected
    assert counter.read_text().count("x") == 1  # the second read reused the first


@pytest.mark.parametrize("script", ["echo 'NVIDIA-SMI has failed' >&2\nexit 9\n", "exec sleep 5\n"])
def test_nvidia_smi_failures_read_as_no_gpus(tmp_path: Path, script: str) -> None:
    probe = NvidiaSmiProbe(_executable(tmp_path / "nvidia-smi", script), timeout_s=0.5, refresh_s=0.0)
    start = time.monotonic()
    assert probe.read() == ()
    assert time.monotonic() - start < 3


def test_missing_nvidia_smi_reads_as_no_gpus(tmp_path: Path) -> None:
    assert NvidiaSmiProbe(str(tmp_path / "absent"), refresh_s=0.0).read() == ()


def test_no_driver_no_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_gpu_probe(nvidia_driver_dir=tmp_path / "no-driver") is None


def test_cpu_model_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338\n"
    )
    assert read_cpu_model(cpuinfo) == "Intel(R) Xeon(R) Gold 6338"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 108.00\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n")
    assert read_cpu_model(cpuinfo) == "Raspberry Pi 5 Model B Rev 1.0"
    assert read_cpu_model(tmp_path / "absent")  # falls back to the platform, never empty


def test_memory_narrowed_by_cgroup_limit(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("805306368\n")
    assert read_memory(tmp_path) == (2**30, 2**28)
    (tmp_path / "memory.max").write_text("max\n")
    total, available = read_memory(tmp_path)
    assert total == psutil.virtual_memory().total
    assert 0 < available <= total

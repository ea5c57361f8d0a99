"""The CLI's pure parts on plain data: `shoal status` tables, progress texts, which model an instance
serves, and the flags `shoal run` gives the node it starts."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from shoal.cli import build_parser
from shoal.client import DownloadView, ModelEntry, RunnerView, instance_from_json
from shoal.commands.placing import is_hub_repo_id, serves
from shoal.commands.progress import ProgressLine, bar, describe_download, describe_instance
from shoal.commands.run import api_url, node_args, node_env
from shoal.commands.status import format_table, render_status

MASTER = "a" * 32
WORKER = "b" * 32
GiB = 1 << 30


def _profile(node_id: str, gpus: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "hostname": f"host-{node_id[0]}",
        "memory_total_bytes": 16 * GiB,
        "memory_available_bytes": 8 * GiB,
        "gpus": gpus,
        "api_address": {"host": "10.0.0.1", "port": 52416},
    }


def _shard(node_id: str, rank: int, start: int, end: int) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "runner_id": f"inst1-r{rank}",
        "rank": rank,
        "layer_start": start,
        "layer_end": end,
        "tp_rank": 0,
        "tp_size": 1,
        "device": "cpu",
    }


INSTANCE = {
    "instance_id": "inst1",
    "card": {"model_id": "SmolLM2-135M-Instruct", "source": "/models/smol.gguf"},
    "sharding": "pipeline",
    "quant": "auto",
    "shards": [_shard(MASTER, 0, 0, 15), _shard(WORKER, 1, 15, 30)],
}
STATE = {
    "last_index": 42,
    "master": MASTER,
    "nodes": {
        MASTER: {"profile": _profile(MASTER, []), "status": "active"},
        WORKER: {
            "profile": _profile(WORKER, [{"name": "RTX 4090", "memory_free_bytes": 20 * GiB}]),
            "status": "timed_out",
        },
    },
    "instances": {"inst1": INSTANCE},
    "runners": {
        "inst1-r0": {"kind": "runner_ready"},
        "inst1-r1": {"kind": "runner_loading", "layers_done": 6, "layers_total": 15},
    },
    "diagnostics": {"node_id": WORKER, "cluster": "home"},
}


def test_status_tables_show_nodes_instances_runners_and_downloads() -> None:
    models = [ModelEntry("SmolLM2-135M-Instruct", "/models/smol.gguf", True, True, ("inst1",))]
    downloads = [DownloadView("d1", "org/tiny", "org--tiny", "downloading", 512 << 20, 1 << 30, None)]
    text = render_status(STATE, models, downloads)
    lines = text.splitlines()
    assert lines[0] == "cluster home, master aaaaaaaa, event 42"
    master_row = next(line for line in lines if line.startswith("aaaaaaaa"))
    assert "master" in master_row and "active" in master_row and "8.0 GiB free of 16.0 GiB" in master_row
    worker_row = next(line for line in lines if line.startswith("bbbbbbbb (this)"))
    assert "member" in worker_row and "timed_out" in worker_row and "RTX 4090 (20.0 GiB free)" in worker_row
    instance_row = next(line for line in lines if line.startswith("inst1 "))
    assert "pipeline x2" in instance_row and "auto" in instance_row and "aaaaaaaa, bbbbbbbb" in instance_row
    assert any(line.startswith("inst1-r0") and line.endswith("ready") for line in lines)
    assert any(
        line.startswith("inst1-r1") and "15-30" in line and "loading 6/15 layers" in line for line in lines
    )
    assert any(line.startswith("d1 ") and "50%" in line and "512.0 MiB of 1.0 GiB" in line for line in lines)


def test_status_without_instances_says_how_to_place_one() -> None:
    text = render_status({**STATE, "instances": {}, "runners": {}, "master": None}, [], [])
    assert "master none (electing)" in text
    assert "no instances (place one with `shoal run MODEL`" in text


def test_table_columns_line_up() -> None:
    table = format_table(["A", "LONG HEADER"], [["wide cell", "x"], ["y", ""]])
    assert table.splitlines() == ["A          LONG HEADER", "wide cell  x", "y"]


def test_progress_texts() -> None:
    assert bar(1, 4, width=8) == "[##......]  25%"
    assert bar(5, 0, width=4) == "[....]   0%"
    loading = instance_from_json(
        {
            **INSTANCE,
            "runners": {"inst1-r0": {"kind": "runner_warming_up"}, "inst1-r1": STATE["runners"]["inst1-r1"]},
        }
    )
    text = describe_instance(loading)
    assert text.startswith("SmolLM2-135M-Instruct (pipeline): aaaaaaaa warming up | bbbbbbbb loading layers")
    assert text.endswith("6/15")
    assert not loading.is_ready and loading.failed_runner() is None
    failed = DownloadView("d", "org/x", "org--x", "failed", 0, None, "HTTPError: 404")
    assert describe_download(failed) == "downloading org/x: failed: HTTPError: 404"


def test_a_failed_runner_is_found_and_a_partial_instance_is_not_ready() -> None:
    view = instance_from_json({**INSTANCE, "runners": {"inst1-r0": {"kind": "runner_ready"}}})
    assert not view.is_ready  # one runner has not reported yet
    failed = instance_from_json(
        {
            **INSTANCE,
            "runners": {
                "inst1-r0": {"kind": "runner_ready"},
                "inst1-r1": {"kind": "runner_failed", "reason": "oom"},
            },
        }
    )
    assert failed.failed_runner() == RunnerView("inst1-r1", WORKER, "runner_failed", reason="oom")


def test_progress_line_redraws_on_a_terminal_and_appends_otherwise() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, log = Terminal(), io.StringIO()
    for out in (terminal, log):
        line = ProgressLine(out)
        for text in ("loading 1/2", "loading 1/2", "ready"):
            line.show(text)
        line.done()
    assert terminal.getvalue() == "\rloading 1/2\rready      \n"
    assert log.getvalue() == "loading 1/2\nready\n"


def test_which_instance_serves_a_model_name(tmp_path: Path) -> None:
    view = instance_from_json(
        {**INSTANCE, "card": {"model_id": "SmolLM2-135M-Instruct", "source": str(tmp_path)}}
    )
    assert serves("default", view, embedded_id="SmolLM2-135M-Instruct")
    assert not serves("default", view, embedded_id=None)
    assert serves("SmolLM2-135M-Instruct", view, None) and serves(str(tmp_path), view, None)
    assert not serves("other-model", view, "SmolLM2-135M-Instruct")
    assert is_hub_repo_id("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert not is_hub_repo_id("default") and not is_hub_repo_id(str(tmp_path)) and not is_hub_repo_id("a/b/c")


def _run_args(*argv: str) -> Any:
    return build_parser().parse_args(["run", *argv])


def test_run_starts_a_local_only_node_unless_a_cluster_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOAL_CLUSTER_KEY", raising=False)
    monkeypatch.delenv("SHOAL_API_KEY", raising=False)
    local = _run_args()
    assert api_url(local) == "http://127.0.0.1:52416"
    assert node_args(local, api_url(local)) == ["--api-port", "52416", "--no-multicast"]
    assert node_env(local) == {}
    on_port = _run_args("--api-url", "http://127.0.0.1:9000", "--data-dir", "/tmp/x")
    assert node_args(on_port, api_url(on_port)) == [
        "--api-port",
        "9000",
        "--data-dir",
        "/tmp/x",
        "--no-multicast",
    ]
    joined = _run_args("--cluster", "home", "--cluster-key", "s3cret", "--api-key", "k")
    flags = node_args(joined, api_url(joined))
    assert flags == ["--api-port", "52416", "--cluster", "home"]  # multicast discovery on, every interface
    assert "s3cret" not in flags and node_env(joined) == {"SHOAL_CLUSTER_KEY": "s3cret", "SHOAL_API_KEY": "k"}
    assert node_args(_run_args("--no-compile"), api_url(local))[-1] == "--no-compile"
    assert (
        node_args(_run_args("default", "hi"), api_url(local))[-1] == "--no-compile"
    )  # one answer, then gone
    peer = _run_args("--peer", "tcp/10.0.0.5:7447", "--no-multicast")
    assert node_args(peer, api_url(peer))[-3:] == ["--peer", "tcp/10.0.0.5:7447", "--no-multicast"]
    monkeypatch.setenv("SHOAL_CLUSTER_KEY", "from-env")
    assert "--no-multicast" not in node_args(local, api_url(local))

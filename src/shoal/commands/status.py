"""`shoal status`: the cluster as one node sees it — nodes, instances, runners, models and downloads —
as tables (or the raw answers with --json). Inputs: GET /state, /models and /models/downloads of the node at
--api-url. `render_status` is a pure function of those answers."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from shoal.client import ApiError, DownloadView, ModelEntry, NodeUnreachable
from shoal.commands.connect import add_api_options, client_for
from shoal.commands.progress import describe_download, format_bytes

SHORT_ID = 8
_RUNNER_PREFIX = "runner_"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status", help="nodes, instances, runners and downloads of the cluster", description=__doc__
    )
    add_api_options(parser)
    parser.add_argument("--json", action="store_true", help="print the node's answers as JSON")
    parser.set_defaults(run=run)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]
    return "\n".join(lines)


def _short(node_id: str) -> str:
    return node_id[:SHORT_ID]


def _memory(profile: Mapping[str, Any]) -> str:
    free, total = profile["memory_available_bytes"], profile["memory_total_bytes"]
    return f"{format_bytes(free)} free of {format_bytes(total)}"


def _gpus(profile: Mapping[str, Any]) -> str:
    gpus = profile.get("gpus") or []
    if not gpus:
        return "-"
    return ", ".join(f"{g['name']} ({format_bytes(g['memory_free_bytes'])} free)" for g in gpus)


def _runner_status(status: Mapping[str, Any]) -> str:
    kind = str(status["kind"]).removeprefix(_RUNNER_PREFIX)
    if kind == "loading":
        return f"loading {status['layers_done']}/{status['layers_total']} layers"
    if kind == "running":
        return f"running {status.get('num_tasks', 1)} task(s)"
    if kind == "failed":
        return f"failed: {status.get('reason')}"
    return kind.replace("_", " ")


def _node_rows(state: Mapping[str, Any]) -> list[list[str]]:
    here = state.get("diagnostics", {}).get("node_id")
    rows = []
    for node_id, record in sorted(state["nodes"].items()):
        profile = record["profile"]
        role = "master" if node_id == state.get("master") else "member"
        api = profile["api_address"]
        rows.append(
            [
                _short(node_id) + (" (this)" if node_id == here else ""),
                role,
                record["status"],
                f"{profile['hostname']} {api['host']}:{api['port']}",
                _memory(profile),
                _gpus(profile),
            ]
        )
    return rows


def _instance_rows(state: Mapping[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    instances, runners = [], []
    for instance_id, instance in sorted(state["instances"].items()):
        shards = instance["shards"]
        instances.append(
            [
                instance_id,
                instance["card"]["model_id"],
                f"{instance['sharding']} x{len(shards)}",
                str(instance.get("quant", "none")),
                ", ".join(_short(shard["node_id"]) for shard in shards),
            ]
        )
        for shard in shards:
            status = state["runners"].get(shard["runner_id"])
            layers = f"{shard['layer_start']}-{shard['layer_end']}"
            if shard["tp_size"] > 1:
                layers += f" tp {shard['tp_rank']}/{shard['tp_size']}"
            runners.append(
                [
                    shard["runner_id"],
                    _short(shard["node_id"]),
                    shard["device"],
                    layers,
                    _runner_status(status) if status is not None else "not reported yet",
                ]
            )
    return instances, runners


def render_status(
    state: Mapping[str, Any], models: Sequence[ModelEntry], downloads: Sequence[DownloadView]
) -> str:
    node_rows = _node_rows(state)
    instance_rows, runner_rows = _instance_rows(state)
    sections = [
        f"cluster {state.get('diagnostics', {}).get('cluster', '?')}, master "
        f"{_short(state['master']) if state.get('master') else 'none (electing)'}, event {state['last_index']}",
        "",
        format_table(["NODE", "ROLE", "STATUS", "ADDRESS", "MEMORY", "GPUS"], node_rows),
        "",
    ]
    if instance_rows:
        sections += [
            format_table(["INSTANCE", "MODEL", "SHARDING", "QUANT", "NODES"], instance_rows),
            "",
            format_table(["RUNNER", "NODE", "DEVICE", "LAYERS", "STATUS"], runner_rows),
        ]
    else:
        sections.append("no instances (place one with `shoal run MODEL` or POST /instances)")
    if models:
        model_rows = [
            [
                m.model_id,
                "embedded" if m.embedded else ("local" if m.local else "elsewhere"),
                str(len(m.instance_ids)),
            ]
            for m in models
        ]
        sections += ["", format_table(["MODEL", "WHERE", "INSTANCES"], model_rows)]
    if downloads:
        sections += [
            "",
            format_table(
                ["DOWNLOAD", "PROGRESS"], [[d.download_id, describe_download(d)] for d in downloads]
            ),
        ]
    return "\n".join(sections)


def run(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        try:
            state = client.state()
            models = client.models()
            downloads = client.downloads()
        except NodeUnreachable:
            print(
                f"shoal status: no node answers at {args.api_url}; start one with `shoal run`",
                file=sys.stderr,
            )
            return 1
        except ApiError as error:
            print(f"shoal status: error: {error}", file=sys.stderr)
            return 1
    if args.json:
        raw = {
            "state": state,
            "models": [asdict(m) for m in models],
            "downloads": [asdict(d) for d in downloads],
        }
        print(json.dumps(raw, indent=2))
    else:
        print(render_status(state, models, downloads))
    return 0

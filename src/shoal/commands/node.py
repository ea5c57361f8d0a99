"""`shoal node`: run this machine as a node of a cluster (the edge: flags and environment become settings)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.identity import default_data_dir
from shoal.net.config import TransportSettings, parse_endpoint

DEFAULT_CLUSTER = "shoal"
DEFAULT_PORT = 7447
DEFAULT_API_PORT = 52416
CLUSTER_KEY_ENV = "SHOAL_CLUSTER_KEY"
API_KEY_ENV = "SHOAL_API_KEY"
HUB_ENDPOINT_ENV = "HF_ENDPOINT"
HUB_OFFLINE_ENV = "HF_HUB_OFFLINE"

if TYPE_CHECKING:
    from shoal.node_settings import NodeSettings


def _endpoint(value: str) -> str:
    try:
        parse_endpoint(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return value


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


STAGES = ("idle", "connecting", "connected", "loading", "loaded", "warming_up", "shutting_down")


def _stage_deadline(value: str) -> tuple[str, float]:
    stage, _, seconds = value.partition("=")
    if stage not in STAGES:
        raise argparse.ArgumentTypeError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    return stage, _positive(seconds)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("node", help="run a cluster node on this machine")
    parser.add_argument("--cluster", default=DEFAULT_CLUSTER, help="cluster name (default: %(default)s)")
    parser.add_argument(
        "--cluster-key",
        default=None,
        help=f"shared secret of the cluster (or env {CLUSTER_KEY_ENV}); without it traffic is authenticated "
        "by the cluster name only, not secret",
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        type=_endpoint,
        metavar="tcp/HOST:PORT",
        help="connect to this peer (repeatable)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="zenoh listen port (default: %(default)s)"
    )
    parser.add_argument(
        "--listen-host",
        default=None,
        help="address to listen on (default: every interface; 127.0.0.1 with --no-multicast and only loopback peers)",
    )
    parser.add_argument(
        "--api-port", type=int, default=DEFAULT_API_PORT, help="HTTP API port (default: %(default)s)"
    )
    parser.add_argument("--api-host", default=None, help="HTTP API address (default: the listen host)")
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require this key (Authorization: Bearer KEY) on every API route but /health (or env {API_KEY_ENV})",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="identity and event log (default: XDG data dir)"
    )
    parser.add_argument(
        "--node-timeout",
        type=_positive,
        default=10.0,
        help="seconds of silence before a node is declared timed out",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_positive,
        default=0.5,
        help="seconds between heartbeats (default: %(default)s)",
    )
    parser.add_argument(
        "--force-master", action="store_true", help="take the master role whatever the election says"
    )
    parser.add_argument(
        "--runner-threads",
        type=_positive_int,
        default=None,
        help="torch threads per runner process (default: torch's own choice)",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="run every decode step eagerly: no torch.compile of one-stream decode (which costs a one-time "
        "compile of ~10-30 s per model shape on a small CPU, cached in the data dir, and makes one-stream "
        "decode ~15-30%% faster)",
    )
    parser.add_argument(
        "--runner-deadline",
        action="append",
        default=[],
        type=_stage_deadline,
        metavar="STAGE=SECONDS",
        help="seconds a runner may spend in a stage before it is failed (repeatable; stages: "
        + ", ".join(STAGES)
        + ")",
    )
    parser.add_argument(
        "--hub-endpoint",
        default=None,
        help=f"Hugging Face hub to download models from (or env {HUB_ENDPOINT_ENV}; default: huggingface.co)",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help=f"download nothing (also with env {HUB_OFFLINE_ENV}=1): only local models",
    )
    parser.add_argument("--no-multicast", action="store_true", help="no multicast discovery: use --peer only")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.set_defaults(run=run)


def build_settings(args: argparse.Namespace) -> NodeSettings:
    from shoal.node_settings import NodeSettings
    from shoal.worker.plan import DEFAULT_DEADLINES

    peers = tuple(args.peer)
    listen_host = args.listen_host
    if listen_host is None:
        loopback_only = args.no_multicast and all(
            parse_endpoint(peer)[1] in ("127.0.0.1", "localhost", "::1") for peer in peers
        )
        listen_host = "127.0.0.1" if loopback_only else "[::]"
    host = listen_host.strip("[]")
    listen_endpoint = f"tcp/[{host}]:{args.port}" if ":" in host else f"tcp/{host}:{args.port}"
    transport = TransportSettings(
        cluster_name=args.cluster,
        listen=(listen_endpoint,),
        connect=peers,
        multicast_scouting=not args.no_multicast,
    )
    key = args.cluster_key if args.cluster_key is not None else os.environ.get(CLUSTER_KEY_ENV)
    return NodeSettings(
        cluster_name=args.cluster,
        cluster_key=key.encode() if key else None,
        transport=transport,
        data_dir=args.data_dir if args.data_dir is not None else default_data_dir(os.environ, Path.home()),
        api_host=args.api_host or ("0.0.0.0" if host == "::" else host),
        api_port=args.api_port,
        node_timeout_s=args.node_timeout,
        heartbeat_interval_s=args.heartbeat_interval,
        force_master=args.force_master,
        runner_threads=args.runner_threads,
        compile_decode=not args.no_compile,
        runner_deadlines=replace(DEFAULT_DEADLINES, **dict(args.runner_deadline)),
        hub_endpoint=args.hub_endpoint or os.environ.get(HUB_ENDPOINT_ENV) or None,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        offline=args.offline or os.environ.get(HUB_OFFLINE_ENV, "").lower() in ("1", "true", "yes"),
    )


def run(args: argparse.Namespace) -> int:
    from shoal.node_main import run_node

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = build_settings(args)
    except ValueError as error:
        print(f"shoal node: {error}", file=sys.stderr)
        return 2
    return run_node(settings)

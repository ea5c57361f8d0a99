"""`shoal run [MODEL] [PROMPT]`: the main job. Use the node on this machine, or start one; make sure MODEL
is served (placing it, with download and loading progress on stderr); then answer PROMPT, or chat when
stdin is a terminal, or keep serving in the foreground until SIGINT/SIGTERM.

A node `shoal run` started is its child and is stopped (SIGTERM, then SIGKILL) whenever `shoal run` exits.
It is local-only (loopback, no multicast) unless a cluster flag is given (--cluster, --cluster-key or env
SHOAL_CLUSTER_KEY, --peer): then it joins that cluster like `shoal node` would. A node that was already
running is used and left running. Secrets reach the child through its environment, not its command line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from shoal.client import ApiError, GenerationFailed, NodeClient, NodeUnreachable
from shoal.commands.chat import chat_loop, stream_answer
from shoal.commands.connect import add_api_options, add_sampling_options, api_key, sampling_fields
from shoal.commands.node import API_KEY_ENV, CLUSTER_KEY_ENV, DEFAULT_API_PORT, DEFAULT_CLUSTER
from shoal.commands.node_process import NodeProcess, NodeStartFailed
from shoal.commands.placing import PlacementFailed, Served, ensure_served
from shoal.commands.progress import ProgressLine

NODE_START_TIMEOUT_S = 120.0  # imports, identity, the quiet start before it elects itself
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        help="start or join the local node, serve a model, answer or chat",
        description="Use the node at --api-url or start one, place MODEL (default: the embedded SmolLM2), then "
        "answer PROMPT, chat (stdin a terminal) or keep serving (stdin not a terminal) until SIGINT/SIGTERM.",
    )
    parser.add_argument(
        "model",
        nargs="?",
        default="default",
        help="'default' (embedded SmolLM2-135M), a model of the node's models dir, a path, or a hub repo id",
    )
    parser.add_argument("prompt", nargs="?", default=None, help="answer this and exit")
    add_api_options(parser, default_url=None)
    add_sampling_options(parser)
    parser.add_argument(
        "--quant",
        choices=("none", "int8", "int4", "auto"),
        default=None,
        help="weight quantization of a new instance (default: the node's, auto)",
    )
    parser.add_argument(
        "--load-timeout", type=float, default=900.0, help="seconds to wait for download and loading"
    )
    node = parser.add_argument_group("the node `shoal run` starts when none answers (see `shoal node -h`)")
    node.add_argument(
        "--cluster", default=None, help=f"cluster to join (default: {DEFAULT_CLUSTER}, local-only)"
    )
    node.add_argument(
        "--cluster-key", default=None, help=f"shared secret of the cluster (or env {CLUSTER_KEY_ENV})"
    )
    node.add_argument(
        "--peer", action="append", default=[], metavar="tcp/HOST:PORT", help="peer to connect to"
    )
    node.add_argument(
        "--port", type=int, default=None, help="the node's cluster port (default: shoal node's)"
    )
    node.add_argument(
        "--api-port", type=int, default=None, help=f"the node's API port (default: {DEFAULT_API_PORT})"
    )
    node.add_argument(
        "--data-dir", type=Path, default=None, help="the node's data dir (default: shoal node's)"
    )
    node.add_argument("--no-multicast", action="store_true", help="no multicast discovery, even in a cluster")
    node.add_argument("--offline", action="store_true", help="the node downloads nothing")
    node.add_argument(
        "--no-compile",
        action="store_true",
        help="the node decodes eagerly: no torch.compile warm-up (always so for a node started for one PROMPT)",
    )
    node.add_argument("--hub-endpoint", default=None, help="Hugging Face hub the node downloads from")
    parser.set_defaults(run=run)


def api_url(args: argparse.Namespace) -> str:
    if args.api_url:
        return str(args.api_url)
    return f"http://127.0.0.1:{args.api_port or DEFAULT_API_PORT}"


def node_args(args: argparse.Namespace, url: str) -> list[str]:
    """`shoal node` flags for the child: the API port of `url`, and local-only unless a cluster is named."""
    port = args.api_port or urlsplit(url).port or DEFAULT_API_PORT
    flags = ["--api-port", str(port)]
    joins = bool(args.cluster or args.cluster_key or os.environ.get(CLUSTER_KEY_ENV) or args.peer)
    if args.cluster:
        flags += ["--cluster", args.cluster]
    for peer in args.peer:
        flags += ["--peer", peer]
    if args.port is not None:
        flags += ["--port", str(args.port)]
    if args.data_dir is not None:
        flags += ["--data-dir", str(args.data_dir)]
    if args.no_multicast or not joins:
        flags.append("--no-multicast")  # with no peers either, the node listens on 127.0.0.1 only
    if args.offline:
        flags.append("--offline")
    if args.no_compile or args.prompt is not None:
        # A node started for one answer stops after it: compiling (a few seconds, more the first time)
        # would cost more than it saves.
        flags.append("--no-compile")
    if args.hub_endpoint:
        flags += ["--hub-endpoint", args.hub_endpoint]
    return flags


def node_env(args: argparse.Namespace) -> dict[str, str]:
    env = {}
    if args.cluster_key:
        env[CLUSTER_KEY_ENV] = args.cluster_key
    key = api_key(args)
    if key:
        env[API_KEY_ENV] = key
    return env


def _log_path(args: argparse.Namespace) -> Path:
    from shoal.identity import default_data_dir

    data_dir = args.data_dir if args.data_dir is not None else default_data_dir(os.environ, Path.home())
    return Path(data_dir) / "node.log"


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like an exit, so every `finally` (stopping a node we started) runs.
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    url = api_url(args)
    with NodeClient(url, api_key(args)) as client:
        node: NodeProcess | None = None
        try:
            node = _node_to_start(client, args, url)
            if node is not None:
                print(f"shoal run: starting a node at {url} (log: {node.log_path})", file=sys.stderr)
                node.start()
                node.wait_until_serving(client, NODE_START_TIMEOUT_S)
            served = ensure_served(
                client, args.model, ProgressLine(sys.stderr), args.load_timeout, args.quant
            )
            return _serve_or_answer(client, served, args, url, node)
        except (NodeStartFailed, PlacementFailed, NodeUnreachable, ApiError, GenerationFailed) as error:
            print(f"shoal run: error: {error}", file=sys.stderr)
            return 1
        finally:
            if node is not None:
                node.stop()  # the one place a node we started ends (also on Ctrl-C and SIGTERM)


def _node_to_start(client: NodeClient, args: argparse.Namespace, url: str) -> NodeProcess | None:
    """None when a healthy node answers at `url`; the node to start when nothing answers there."""
    try:
        health = client.health()
    except NodeUnreachable:
        if urlsplit(url).hostname not in LOOPBACK_HOSTS:
            raise  # a node on another machine is not ours to start
        return NodeProcess(node_args(args, url), _log_path(args), node_env(args))
    if health.status != "ok":
        raise NodeStartFailed(f"the node at {url} is not healthy: {health.status}")
    return None


def _serve_or_answer(
    client: NodeClient, served: Served, args: argparse.Namespace, url: str, node: NodeProcess | None
) -> int:
    params = sampling_fields(args)
    if args.prompt is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        answer = stream_answer(
            client,
            served.model,
            [*messages, {"role": "user", "content": args.prompt}],
            params,
            sys.stdout,
            sys.stderr,
        )
        return 130 if answer.interrupted else 0
    if sys.stdin.isatty():
        return chat_loop(client, served.model, params, args.system, sys.stdin, sys.stdout, sys.stderr)
    return _serve(served, url, node)


def _serve(served: Served, url: str, node: NodeProcess | None) -> int:
    """Stay in the foreground until SIGINT/SIGTERM (or until the node we started exits by itself)."""
    instance = served.instance
    print(f"serving {instance.model_id} (model name {served.model!r}) at {url}", flush=True)
    print(f"OpenAI-compatible API: {url}/v1   Ollama: {url}/api   state: {url}/state", flush=True)
    try:
        while True:
            code = None if node is None else node.exit_code()
            if node is not None and code is not None:
                print(f"shoal run: the node exited with status {code}:\n{node.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except (KeyboardInterrupt, SystemExit):
        return 0  # SIGINT or SIGTERM: the asked-for way to stop serving

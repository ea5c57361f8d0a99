"""`run_node(settings)`: the `shoal node` process from start to exit: identity, API socket, banner, then
the node until SIGINT/SIGTERM."""

from __future__ import annotations

import sys
import time

import anyio

from shoal.identity import IdentityError, load_or_create_identity
from shoal.master.event_log import EventLogError
from shoal.net.sealing import Sealer
from shoal.net.transport import TransportOpenError
from shoal.node import Node
from shoal.node_settings import NodeSettings, banner
from shoal.node_startup import StartupError, advertised_host, bind_api_socket
from shoal.types import ApiAddress
from shoal.worker.profile import ProfileGatherer, read_network_interfaces


def run_node(settings: NodeSettings) -> int:
    """Load (or create) this node's identity, say who it is, and run until SIGINT/SIGTERM. What stops the
    node from starting (its key, its log, a taken port) is one line on stderr and exit status 1."""
    try:
        identity = load_or_create_identity(settings.data_dir)
        node_id = identity.node_id
        sealer = Sealer(settings.cluster_key, settings.cluster_name, node_id)
        api_socket = bind_api_socket(settings.api_host, settings.api_port)
    except (IdentityError, StartupError) as error:
        print(f"shoal node: {error}", file=sys.stderr, flush=True)
        return 1
    advertised = advertised_host(settings.api_host, read_network_interfaces())
    profiles = ProfileGatherer(
        node_id,
        settings.data_dir / "models",
        ApiAddress(host=advertised, port=api_socket.getsockname()[1]),
        time.time(),
    )
    print(banner(settings, node_id, sealer.has_secret), file=sys.stderr, flush=True)
    try:
        node = Node(settings, node_id, sealer, profiles)
        anyio.run(node.run, api_socket)
    except (EventLogError, TransportOpenError) as error:
        print(f"shoal node: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        api_socket.close()
    return 0

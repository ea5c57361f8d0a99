"""What `shoal node` settles before it runs: the API's listening socket and the address it advertises.

- `bind_api_socket` binds the HTTP port up front, so a taken port is one clear error before anything else
  starts (uvicorn would log and exit from inside the running node).
- `advertised_host` is the address other nodes and clients should use for this node's API: the bind
  address itself, unless that is a wildcard (0.0.0.0, ::), which no one can connect to; then the first
  non-loopback address of an up interface (IPv4 first), and loopback only when there is nothing else.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from shoal.types import NetworkInterface

WILDCARDS = ("", "0.0.0.0", "::", "[::]")


class StartupError(Exception):
    """The node cannot start; the message says what to change."""


def bind_api_socket(host: str, port: int) -> socket.socket:
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((bare, port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise StartupError(
            f"cannot listen for the HTTP API on {host}:{port}: {error.strerror or error} "
            "(is another node using this port? pick one with --api-port)"
        ) from error
    sock.setblocking(False)
    return sock


def advertised_host(bind_host: str, interfaces: Sequence[NetworkInterface]) -> str:
    if bind_host not in WILDCARDS:
        return bind_host.strip("[]")
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for interface in interfaces:
        for address in interface.addresses:
            try:
                ip = ipaddress.ip_address(address.split("%")[0])
            except ValueError:
                continue
            if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast):
                candidates.append(ip)
    for ip in candidates:
        if ip.version == 4:
            return str(ip)
    return str(candidates[0]) if candidates else "127.0.0.1"

"""Start real `shoal node` processes on loopback: for multi-node tests, benchmarks and local experiments.

Every node gets free ports on 127.0.0.1, its own data directory, multicast off and explicit `--peer`
endpoints to the others, so nothing leaves the machine. `stop_all` always kills what it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalNode:
    name: str
    data_dir: Path
    port: int
    api_port: int
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the inherited environment
    api_key: str | None = None  # sent by `get` (and `headers`) when the node requires one
    process: subprocess.Popen[bytes] | None = None
    _log_file: Any = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"tcp/127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "node.log"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        command = [sys.executable, "-m", "shoal.cli", "node", *self.args]
        self.process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye, no clean shutdown."""
        self._stop(signal.SIGKILL)

    def terminate(self) -> None:
        self._stop(signal.SIGTERM)

    def _stop(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str, timeout: float = 2.0) -> Any:
        response = httpx.get(self.api_url + path, timeout=timeout, headers=self.headers)
        response.raise_for_status()
        return response.json()

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.get("/state")
        return state

    def node_id(self) -> str:
        return str(self.get("/health")["node_id"])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class LocalCluster:
    root: Path
    cluster: str = "local"
    node_timeout_s: float = 2.0
    heartbeat_interval_s: float = 0.25
    # Off by default: each test node would compile its decode layers (10-30 s on 2 cores) in a cache of its own.
    compile_decode: bool = False
    nodes: list[LocalNode] = field(default_factory=list)

    def add(
        self,
        num: int = 1,
        *,
        cluster_key: str | None = None,
        api_key: str | None = None,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        start: bool = True,
    ) -> list[LocalNode]:
        """Create (and start) `num` nodes that peer with every node created before them and each other."""
        new = [
            LocalNode(
                name=f"n{len(self.nodes) + i}",
                data_dir=self.root / f"n{len(self.nodes) + i}",
                port=free_port(),
                api_port=free_port(),
                args=[],
                env=dict(env or {}),
                api_key=api_key,
            )
            for i in range(num)
        ]
        everyone = [*self.nodes, *new]
        for node in new:
            peers = [arg for other in everyone if other is not node for arg in ("--peer", other.endpoint)]
            node.args = [
                "--cluster",
                self.cluster,
                "--no-multicast",
                "--port",
                str(node.port),
                "--api-port",
                str(node.api_port),
                "--data-dir",
                str(node.data_dir),
                "--node-timeout",
                str(self.node_timeout_s),
                "--heartbeat-interval",
                str(self.heartbeat_interval_s),
                *peers,
                *(() if self.compile_decode else ("--no-compile",)),
                *extra,
            ]
            if cluster_key is not None:
                node.args += ["--cluster-key", cluster_key]
            if api_key is not None:
                node.args += ["--api-key", api_key]
        self.nodes.extend(new)
        if start:
            for node in new:
                node.start()
        return new

    def wait_until(self, predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
        """Poll `predicate()` until it returns something truthy; raise TimeoutError naming `what`."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                result = predicate()
            except (httpx.HTTPError, OSError, KeyError, ValueError) as error:
                last_error = error
                result = None
            if result:
                return result
            time.sleep(interval)
        detail = f" (last error: {last_error})" if last_error else ""
        raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}{detail}")

    def stop_all(self) -> None:
        for node in self.nodes:
            node.kill()

"""A `shoal node` that `shoal run` starts as its child when no node answers on this machine.

Input: the node flags `shoal run` passes through (a list of arguments) and where the node's output goes.
The child runs with the same Python, in its own session, so a Ctrl-C meant to stop an answer in the
terminal does not reach it; on Linux it also gets SIGTERM should `shoal run` die without stopping it.
`stop` is the one way it ends: SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from shoal.client import NodeClient, NodeUnreachable

STOP_GRACE_S = 15.0
_PR_SET_PDEATHSIG = 1


class NodeStartFailed(RuntimeError):
    """The child node exited or never answered; the message carries the end of its log."""


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel for SIGTERM when the parent dies.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _is_active(client: NodeClient, node_id: str) -> bool:
    record = client.state()["nodes"].get(node_id)
    return record is not None and record["status"] == "active"


class NodeProcess:
    def __init__(self, node_args: Sequence[str], log_path: Path, env: Mapping[str, str]) -> None:
        self.node_args = list(node_args)
        self.log_path = log_path
        self.env = dict(env)  # added to the inherited environment (secrets go here, not on the command line)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "shoal.cli", "node", *self.node_args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def exit_code(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def wait_until_serving(self, client: NodeClient, timeout_s: float) -> None:
        """Until its API answers, it knows a master and the cluster lists it as active (placement needs
        both); NodeStartFailed otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.exit_code()
            if code is not None:
                raise NodeStartFailed(f"the node exited with status {code}:\n{self.log_tail()}")
            try:
                health = client.health()
                if health.status != "ok":
                    raise NodeStartFailed(f"the node is not healthy ({health.status}):\n{self.log_tail()}")
                if health.master is not None and _is_active(client, health.node_id):
                    return
            except NodeUnreachable:
                pass  # not listening yet: keep waiting
            if time.monotonic() > deadline:
                raise NodeStartFailed(f"the node did not come up within {timeout_s:g} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def wait(self) -> int:
        assert self._process is not None, "start() first"
        return self._process.wait()

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL; the exit status (None when never started)."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def log_tail(self, num_lines: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as error:
            return f"(cannot read {self.log_path}: {error})"
        return "\n".join(lines[-num_lines:])

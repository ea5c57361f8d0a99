"""Starting and ending one runner OS process: `python -m shoal.runner` on one end of a socket pair.

The supervisor keeps the other end. The child holds the only other copy of its end, so the kernel closes
it the moment the process dies, whatever kills it: EOF on the supervisor's end is the exit signal, with no
polling. `reap` collects the exit status so no zombie is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Mapping
from multiprocessing.connection import Connection

import anyio

from shoal.runner.spec import RunnerSpec


def start_runner_process(
    spec: RunnerSpec, python: str, extra_env: Mapping[str, str]
) -> tuple[subprocess.Popen[bytes], Connection]:
    """Spawn the runner and hand it its spec; returns the process and the supervisor's end."""
    ours, theirs = socket.socketpair()
    try:
        env = {**os.environ, **extra_env}
        process = subprocess.Popen(
            [python, "-m", "shoal.runner", "--fd", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    conn = Connection(ours.detach())
    # If the process died at once, the supervisor sees EOF and reports its exit status.
    with contextlib.suppress(OSError):
        conn.send(spec)
    return process, conn


async def reap(process: subprocess.Popen[bytes], grace_s: float) -> int:
    """Wait up to `grace_s` for the process to exit, then SIGKILL it; returns its exit status."""
    with anyio.move_on_after(grace_s):
        while process.poll() is None:
            await anyio.sleep(0.01)
    if process.poll() is None:
        kill(process)
        while process.poll() is None:
            await anyio.sleep(0.01)
    assert process.returncode is not None
    return process.returncode


def kill(process: subprocess.Popen[bytes]) -> None:
    # It may exit between the poll and the kill; the next poll reaps it either way.
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"

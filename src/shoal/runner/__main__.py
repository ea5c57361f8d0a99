"""`python -m shoal.runner --fd N`: a runner process, spawned by the supervisor (shoal.worker.supervisor).

The edge of the runner process: the only place that reads its environment (test-only fault injection)
and its arguments. File descriptor N is the runner's end of a socket pair; the first message on it is the
RunnerSpec. The exit code is 0 after a requested shutdown, 1 after a failure (reported before exiting).
"""

from __future__ import annotations

import argparse
import os
import sys
from multiprocessing.connection import Connection

from shoal.runner.spec import RunnerFaults, RunnerSpec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.runner")
    parser.add_argument("--fd", type=int, required=True, help="the supervisor connection's file descriptor")
    args = parser.parse_args(argv)
    conn = Connection(args.fd)
    spec = conn.recv()
    if not isinstance(spec, RunnerSpec):
        print(f"shoal runner: expected a RunnerSpec first, got {type(spec).__name__}", file=sys.stderr)
        return 2
    try:
        faults = RunnerFaults.from_environ(os.environ)
    except ValueError as exc:
        print(f"shoal runner: {exc}", file=sys.stderr)
        return 2
    # Imported here so that a bad start (above) fails before torch's import time is spent.
    from shoal.runner.serve import serve

    return serve(spec, conn, faults)


if __name__ == "__main__":
    code = main()
    # Everything is reported by now; skip the interpreter's teardown of torch's thread pools and the
    # process group, which takes seconds and would delay the supervisor seeing the exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""The runner's end of its supervisor connection: a reader thread feeding an inbox, and typed sends.

The main thread owns every send (status reports, chunk batches), the reader thread every receive, so the
connection is never used from two threads in the same direction. If the supervisor goes away (EOF), the
runner is asked to stop, and exits on its own after a grace period if it cannot (e.g. stuck in a stage).
"""

from __future__ import annotations

import os
import queue
import threading
from multiprocessing.connection import Connection

from shoal.runner.messages import ChunkBatch, StatusReport, StopRunner, SupervisorMessage, TaskChunk
from shoal.types.runners import RunnerStatus

ORPHAN_GRACE_S = 10.0


class SupervisorLink:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.inbox: queue.Queue[SupervisorMessage | None] = queue.Queue()
        self.stop_requested = threading.Event()
        self._status: RunnerStatus | None = None
        self._reader = threading.Thread(target=self._read, name="supervisor-link", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def report(self, status: RunnerStatus) -> None:
        if status != self._status:
            self._status = status
            self._send(StatusReport(status))

    def send_chunks(self, chunks: list[TaskChunk]) -> None:
        if chunks:
            self._send(ChunkBatch(tuple(chunks)))

    def _send(self, message: StatusReport | ChunkBatch) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError):
            # The supervisor is gone; the reader thread has seen EOF (or will) and stops the runner.
            self.stop_requested.set()

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self.stop_requested.set()
                self.inbox.put(None)
                orphan_timer = threading.Timer(ORPHAN_GRACE_S, os._exit, (1,))
                orphan_timer.daemon = True
                orphan_timer.start()
                return
            if isinstance(message, StopRunner):
                self.stop_requested.set()
            self.inbox.put(message)

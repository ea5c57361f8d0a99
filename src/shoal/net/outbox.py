"""Outbound frames: a bounded queue drained by one thread that puts them on zenoh.

Why a thread: frames are put with zenoh's BLOCK congestion control, so that a busy machine (a starved zenoh
transmit thread) delays control messages instead of dropping them, as DROP does after 1 ms. A blocking put
must never stall the event loop, so it happens here. One thread keeps frames in the order they were sealed.
If a link stays blocked, zenoh closes it after its `wait_before_close` (5 s by default), so the thread
never hangs for long. When the queue is full, `put` waits (backpressure on the publisher, not the loop).
"""

from __future__ import annotations

import logging
import queue
import threading

import anyio
import zenoh

log = logging.getLogger(__name__)

_STOP = None


class Outbox:
    def __init__(self, session: zenoh.Session, name: str, max_frames: int) -> None:
        self._session = session
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=max_frames)
        self.num_send_failures = 0
        self._thread = threading.Thread(target=self._run, name=f"shoal-outbox-{name}", daemon=True)
        self._thread.start()

    async def put(self, key: str, frame: bytes) -> None:
        try:
            self._queue.put_nowait((key, frame))
        except queue.Full:
            await anyio.to_thread.run_sync(self._queue.put, (key, frame))

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            key, frame = item
            try:
                self._session.put(key, frame, congestion_control=zenoh.CongestionControl.BLOCK)
            except Exception:
                # Top of the sender loop: a failed put (e.g. the session closing under us) loses this frame
                # only; receivers recover events by range requests and heartbeats repeat.
                self.num_send_failures += 1
                log.exception("could not put a frame on %s", key)

    async def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop the thread (waits at most `timeout` seconds)."""
        await anyio.to_thread.run_sync(self._stop_and_join, timeout)

    def _stop_and_join(self, timeout: float) -> None:
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.warning("outbox still full after %.0f s; abandoning the queued frames", timeout)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("outbox thread did not stop within %.0f s", timeout)

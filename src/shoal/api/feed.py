"""Fan-out of applied events to live listeners (the /events SSE streams).

Each listener gets its own bounded buffer; a listener that falls that far behind is cut off (its stream
ends) rather than slowing the node down — an SSE client reconnects with `from_index` and loses nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from shoal.types import IndexedEvent

LISTENER_BUFFER = 10_000


class EventFeed:
    def __init__(self, buffer: int = LISTENER_BUFFER) -> None:
        self._buffer = buffer
        self._listeners: set[MemoryObjectSendStream[IndexedEvent]] = set()
        self.num_cut_off = 0

    def publish(self, events: Sequence[IndexedEvent]) -> None:
        for listener in list(self._listeners):
            try:
                for event in events:
                    listener.send_nowait(event)
            except anyio.WouldBlock:
                self.num_cut_off += 1
                self._drop(listener)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._drop(listener)

    def listen(self) -> MemoryObjectReceiveStream[IndexedEvent]:
        """A stream of every event published from now on; close it when done."""
        send, receive = anyio.create_memory_object_stream[IndexedEvent](self._buffer)
        self._listeners.add(send)
        return receive

    def _drop(self, listener: MemoryObjectSendStream[IndexedEvent]) -> None:
        self._listeners.discard(listener)
        listener.close()

    def close(self) -> None:
        for listener in list(self._listeners):
            self._drop(listener)

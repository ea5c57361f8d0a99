"""The cluster's message transport: sealed frames over zenoh in peer mode.

Inputs: `TransportSettings` (where to listen, whom to connect to, discovery) and a `Sealer` (who we are,
the cluster key). Outputs: `publish`/`send` to put frames on the wire, `subscribe`/`subscribe_direct` for
async iterators of `(sender, payload)`, and `drops` counting every frame that was not delivered.

Key layout under `shoal/<cluster>/`:

    all/<topic>              broadcast to every node
    to/<node_id>/<topic>     directed to one node

Each node declares exactly two zenoh subscribers (`all/**` and `to/<own id>/**`), so every frame is opened
once (the replay window is shared) and then fanned out to local subscriptions in Python. The key suffix is
authenticated with the frame, so a frame cannot be moved to another topic or recipient.

Invariants: zenoh's callback threads never block on us and never raise into zenoh: they open the frame,
then hand it to the event loop with `call_soon_threadsafe` under a bound (`max_pending_frames`); frames
that fail to open or do not fit are counted and dropped. Consumers never see a bad frame, only the counts.
Own frames are delivered too (like any other node's): consumers filter by sender when they need to.
Requires the asyncio backend (anyio on asyncio).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from types import TracebackType

import anyio
import zenoh
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from shoal.net.config import TransportSettings
from shoal.net.outbox import Outbox
from shoal.net.sealing import DropCounters, DropReason, FrameError, Sealer
from shoal.types.ids import NodeId

log = logging.getLogger(__name__)

_TOPIC = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_NODE_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
# Dropped frames are always counted; a warning with the counts goes to the log at most this often.
DROP_WARNING_INTERVAL_S = 10.0

Message = tuple[NodeId, bytes]


class TransportClosedError(Exception):
    """The transport was used after `close()`."""


class TransportOpenError(Exception):
    """Zenoh refused to start, e.g. the listen port is taken."""


def check_topic(topic: str) -> str:
    if not _TOPIC.match(topic):
        raise ValueError(
            f"invalid topic {topic!r}: use '/'-separated segments of letters, digits, '_', '.', '-'"
        )
    return topic


def _check_node_id(node_id: str) -> str:
    if not _NODE_ID.match(node_id):
        raise ValueError(f"invalid node id {node_id!r} for a directed topic")
    return node_id


class Subscription:
    """Frames on one topic, as an async iterator of `(sender, payload)`; ends when closed."""

    def __init__(self, transport: Transport, route: str, buffer: int) -> None:
        self._transport = transport
        self.route = route  # "all/<topic>" or "to/<own id>/<topic>"
        self._send: MemoryObjectSendStream[Message]
        self._receive: MemoryObjectReceiveStream[Message]
        self._send, self._receive = anyio.create_memory_object_stream[Message](buffer)

    def _offer(self, message: Message) -> bool:
        """Called on the event loop; False when the consumer is too far behind (the frame is dropped)."""
        try:
            self._send.send_nowait(message)
        except anyio.WouldBlock:
            return False
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return True  # the consumer is gone; not a drop
        return True

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._receive.close()
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop delivery. A consumer waiting in `async for` gets what was buffered, then the loop ends."""
        self._transport._remove(self)
        self._send.close()
        if self._receive.statistics().tasks_waiting_receive == 0:
            self._receive.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Transport:
    """One node's connection to its cluster. Create with `await Transport.open(settings, sealer)`."""

    def __init__(self, settings: TransportSettings, sealer: Sealer, session: zenoh.Session) -> None:
        if sealer.cluster_name != settings.cluster_name:
            raise ValueError(
                f"sealer is for cluster {sealer.cluster_name!r}, settings for {settings.cluster_name!r}"
            )
        self.settings = settings
        self.node_id = NodeId(_check_node_id(sealer.sender_id))
        self._sealer = sealer
        self._session = session
        self._prefix = f"shoal/{settings.cluster_name}/"
        self._loop = asyncio.get_running_loop()
        self._routes: dict[str, list[Subscription]] = {}
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._closed = False
        self._last_drop_warning = -DROP_WARNING_INTERVAL_S
        self._subscribers = [
            session.declare_subscriber(self._prefix + "all/**", self._on_sample),
            session.declare_subscriber(f"{self._prefix}to/{self.node_id}/**", self._on_sample),
        ]
        self._outbox = Outbox(session, self.node_id, settings.max_outbox_frames)

    @classmethod
    async def open(cls, settings: TransportSettings, sealer: Sealer) -> Transport:
        config = settings.zenoh_config()
        try:
            session = await anyio.to_thread.run_sync(zenoh.open, config)
        except zenoh.ZError as error:
            raise TransportOpenError(
                f"could not open the transport (listen {', '.join(settings.listen)}): {error}"
            ) from error
        try:
            return cls(settings, sealer, session)
        except BaseException:
            await anyio.to_thread.run_sync(session.close)
            raise

    @property
    def drops(self) -> DropCounters:
        """Frames dropped by reason: the sealer's rejections plus `overflow` from full queues."""
        return self._sealer.drops

    def peers(self) -> list[str]:
        """Zenoh ids of the peers this session is connected to right now."""
        return [str(zid) for zid in self._session.info.peers_zid()]

    def links(self) -> list[tuple[str, str]]:
        """(source, destination) locators of every open link, e.g. to check that nothing left loopback."""
        return [(link.src, link.dst) for link in self._session.info.links()]

    async def publish(self, topic: str, payload: bytes) -> None:
        """Broadcast `payload` on `topic` to every node of the cluster (this one included)."""
        await self._put("all/" + check_topic(topic), payload)

    async def send(self, node_id: NodeId, topic: str, payload: bytes) -> None:
        """Send `payload` on `topic` to one node only."""
        await self._put(f"to/{_check_node_id(node_id)}/{check_topic(topic)}", payload)

    async def _put(self, route: str, payload: bytes) -> None:
        if self._closed:
            raise TransportClosedError(f"transport of node {self.node_id} is closed")
        frame = self._sealer.seal(payload, context=route.encode())
        await self._outbox.put(self._prefix + route, frame)

    def subscribe(self, topic: str, *, buffer: int | None = None) -> Subscription:
        """Broadcasts on `topic`, from every node including this one.

        `buffer` (default `settings.subscription_buffer`) bounds how far the consumer may fall behind.
        """
        return self._add("all/" + check_topic(topic), buffer)

    def subscribe_direct(self, topic: str, *, buffer: int | None = None) -> Subscription:
        """Frames sent to this node on `topic` with `send`."""
        return self._add(f"to/{self.node_id}/{check_topic(topic)}", buffer)

    def _add(self, route: str, buffer: int | None) -> Subscription:
        if self._closed:
            raise TransportClosedError(f"transport of node {self.node_id} is closed")
        subscription = Subscription(self, route, buffer or self.settings.subscription_buffer)
        self._routes.setdefault(route, []).append(subscription)
        return subscription

    def _remove(self, subscription: Subscription) -> None:
        subscriptions = self._routes.get(subscription.route, [])
        if subscription in subscriptions:
            subscriptions.remove(subscription)
            if not subscriptions:
                del self._routes[subscription.route]

    def _on_sample(self, sample: zenoh.Sample) -> None:
        """On a zenoh thread: open, then hand over to the event loop. Must never block or raise."""
        try:
            route = str(sample.key_expr).removeprefix(self._prefix)
            try:
                sender, payload = self._sealer.open(sample.payload.to_bytes(), context=route.encode())
            except FrameError as error:
                self._warn_drop(route, error.reason, error.detail)
                return
            with self._pending_lock:
                if self._closed or self._pending >= self.settings.max_pending_frames:
                    if not self._closed:
                        self.drops.add(DropReason.OVERFLOW)
                        self._warn_drop(
                            route, DropReason.OVERFLOW, "too many frames waiting for the event loop"
                        )
                    return
                self._pending += 1
            self._loop.call_soon_threadsafe(self._dispatch, route, sender, payload)
        except Exception:
            # Top of zenoh's callback: a bug here must not kill zenoh's thread; count it as malformed.
            log.exception("unexpected error handling a frame")
            self.drops.add(DropReason.MALFORMED)

    def _dispatch(self, route: str, sender: NodeId, payload: bytes) -> None:
        """On the event loop: deliver one opened frame to every subscription on its route."""
        with self._pending_lock:
            self._pending -= 1
        for subscription in list(self._routes.get(route, ())):
            if not subscription._offer((sender, payload)):
                self.drops.add(DropReason.OVERFLOW)
                self._warn_drop(route, DropReason.OVERFLOW, "a subscriber is too far behind")

    def _warn_drop(self, route: str, reason: DropReason, detail: str) -> None:
        """Rate-limited, from any thread (a race costs at most one extra line)."""
        now = time.monotonic()
        if now - self._last_drop_warning >= DROP_WARNING_INTERVAL_S:
            self._last_drop_warning = now
            log.warning(
                "dropped a frame on %s (%s: %s); dropped so far: %s",
                route,
                reason,
                detail,
                self.drops.snapshot(),
            )

    async def close(self) -> None:
        """Stop receiving, end every subscription's iterator, and leave the cluster."""
        if self._closed:
            return
        with self._pending_lock:
            self._closed = True
        for subscriptions in list(self._routes.values()):
            for subscription in list(subscriptions):
                subscription.close()
        for subscriber in self._subscribers:
            subscriber.undeclare()
        await self._outbox.close()
        await anyio.to_thread.run_sync(self._session.close)

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

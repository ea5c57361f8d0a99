"""`shoal node`: wires identity, transport, election, the master role, the replica and the HTTP API.

Inputs: `NodeSettings` (built by the CLI) and frames from the cluster. Outputs: heartbeats, commands and
range requests to the cluster; the master role's events and replies while this node is elected; the HTTP
API; one log line per applied event.

Every message travels on one topic, `cluster`: broadcasts under `all/cluster`, directed messages under
`to/<node id>/cluster`. The transport delivers a node's own frames too, so a node that is its own master
sends itself commands and replies by the same path as everyone else.

Invariants: the master role runs only while this node's election says so, in its own cancel scope; a
message that fails to decode, or claims another sender than the one that sealed it, is counted and dropped;
one task group owns every task and one `finally` closes the transport and the log.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream
from pydantic import ValidationError

from shoal.api.app import create_app
from shoal.api.feed import EventFeed
from shoal.election import Candidate, Election, ElectionSettings, next_term
from shoal.identity import load_or_create_identity
from shoal.master.master import Master, MasterSettings
from shoal.net.config import TransportSettings
from shoal.net.sealing import Sealer
from shoal.net.transport import Transport
from shoal.node_links import LinkProber
from shoal.node_log import describe_event
from shoal.replica import Replica
from shoal.types import (
    ApiAddress,
    Command,
    CommandAccepted,
    CommandEnvelope,
    CommandId,
    CommandRejected,
    EventRange,
    EventRangeRequest,
    Heartbeat,
    IndexedEvent,
    NodeId,
    Ping,
    Pong,
    State,
    WireMessage,
    decode_wire_message,
    encode_wire_message,
    new_command_id,
)
from shoal.worker.profile import ProfileGatherer

log = logging.getLogger("shoal.node")

TOPIC = "cluster"
CommandReply = CommandAccepted | CommandRejected


@dataclass(frozen=True)
class NodeSettings:
    cluster_name: str
    cluster_key: bytes | None
    transport: TransportSettings
    data_dir: Path
    api_host: str
    api_port: int
    node_timeout_s: float
    heartbeat_interval_s: float
    force_master: bool
    command_timeout_s: float = 5.0
    profile_update_interval_s: float = 5.0

    @property
    def liveness_s(self) -> float:
        """A peer whose heartbeats stop for this long no longer counts for the election."""
        return 4 * self.heartbeat_interval_s

    @property
    def tick_s(self) -> float:
        return min(0.1, self.heartbeat_interval_s / 2)


class _PendingReplies:
    """Commands this node sent, waiting for the master's answer."""

    def __init__(self) -> None:
        self._events: dict[CommandId, anyio.Event] = {}
        self._replies: dict[CommandId, CommandReply] = {}

    def expect(self, command_id: CommandId) -> anyio.Event:
        event = anyio.Event()
        self._events[command_id] = event
        return event

    def resolve(self, reply: CommandReply) -> None:
        event = self._events.get(reply.command_id)
        if event is not None and not event.is_set():
            self._replies[reply.command_id] = reply
            event.set()

    def take(self, command_id: CommandId) -> CommandReply | None:
        self._events.pop(command_id, None)
        return self._replies.pop(command_id, None)


class Node:
    def __init__(
        self, settings: NodeSettings, node_id: NodeId, sealer: Sealer, profiles: ProfileGatherer
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self._sealer = sealer
        self._profiles = profiles
        self._started = time.monotonic()
        self.replica = Replica(node_id, settings.data_dir / "events.sqlite3", request_retry_s=0.5)
        self.election = Election(
            node_id,
            ElectionSettings(liveness_s=settings.liveness_s, settle_s=settings.liveness_s),
            started_at=self._started,
        )
        self.feed = EventFeed()
        self.replica.add_listener(self.feed.publish)
        self.replica.add_listener(self._log_events)
        self._links = LinkProber(node_id)
        self._transport: Transport | None = None
        self._master: Master | None = None
        self._master_scope: anyio.CancelScope | None = None
        self._followed: NodeId | None = None
        self._pending = _PendingReplies()
        self._counters: dict[str, int] = {
            "undecodable": 0,
            "spoofed_sender": 0,
            "clashing_node_id": 0,
            "commands_rejected": 0,
            "commands_timed_out": 0,
        }

    # --- what the API sees -------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.replica.state

    @property
    def is_master(self) -> bool:
        return self._master is not None

    def diagnostics(self) -> dict[str, Any]:
        drops = self._transport.drops.snapshot() if self._transport is not None else {}
        return {
            "node_id": self.node_id,
            "role": "master" if self.is_master else "follower",
            "master": self._followed,
            "term": self.replica.state.term,
            "cluster": self.settings.cluster_name,
            "cluster_key_secret": self._sealer.has_secret,
            "dropped_frames": drops,
            "dropped_frames_total": sum(drops.values()),
            "dropped_messages": dict(self._counters),
            "master_rejected_commands": self._master.num_rejected_commands if self._master else 0,
            "replica_rejected_events": self.replica.num_rejected_events,
            "replica_truncations": self.replica.num_truncations,
            "link_rtts_ms": self._links.rtts_ms(),
            "sse_listeners_cut_off": self.feed.num_cut_off,
        }

    def read_events(self, first: int, last: int) -> Sequence[IndexedEvent]:
        return self.replica.read_range(first, last)

    def listen_events(self) -> MemoryObjectReceiveStream[IndexedEvent]:
        return self.feed.listen()

    async def submit(self, command: Command) -> CommandReply | None:
        """Send `command` to the master, resending while the master changes; None if no answer in time."""
        envelope = CommandEnvelope(command_id=new_command_id(), origin=self.node_id, command=command)
        answered = self._pending.expect(envelope.command_id)
        with anyio.move_on_after(self.settings.command_timeout_s):
            while not answered.is_set():
                if self._followed is not None:
                    await self._send(self._followed, envelope)
                with anyio.move_on_after(1.0):
                    await answered.wait()
        reply = self._pending.take(envelope.command_id)
        if reply is None:
            self._counters["commands_timed_out"] += 1
        elif isinstance(reply, CommandRejected):
            self._counters["commands_rejected"] += 1
        return reply

    # --- running -----------------------------------------------------------------------------------------

    async def run(self) -> None:
        transport = await Transport.open(self.settings.transport, self._sealer)
        self._transport = transport
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(self, self.settings.command_timeout_s),
                host=self.settings.api_host,
                port=self.settings.api_port,
                log_level="warning",
                lifespan="off",
            )
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._receive, transport.subscribe(TOPIC))
                tg.start_soon(self._receive, transport.subscribe_direct(TOPIC))
                tg.start_soon(self._heartbeats)
                tg.start_soon(self._control, tg)
                tg.start_soon(self._serve_api, server)
                tg.start_soon(self._stop_on_signal, tg)
        finally:
            server.should_exit = True
            self.feed.close()
            with anyio.CancelScope(shield=True):
                await transport.close()
            self.replica.close()
            log.info("node %s stopped", self.node_id)

    async def _serve_api(self, server: uvicorn.Server) -> None:
        # uvicorn installs no signal handlers when served this way; the node owns SIGINT/SIGTERM.
        await server.serve()

    async def _stop_on_signal(self, tg: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for received in signals:
                log.info("received %s, stopping", signal.Signals(received).name)
                tg.cancel_scope.cancel()
                return

    async def _heartbeats(self) -> None:
        beat = 0
        while True:
            rtts = self._links.rtts_ms(live=self._live_peers())
            profile = await anyio.to_thread.run_sync(self._profiles.gather, rtts)
            await self._broadcast(
                Heartbeat(
                    node_id=self.node_id,
                    term=self.replica.state.term,
                    last_index=self.replica.state.last_index,
                    force_master=self.settings.force_master,
                    is_master=self.is_master,
                    profile=profile,
                )
            )
            if beat % 4 == 0:
                for peer in self._live_peers():
                    await self._send(peer, self._links.ping(peer, time.monotonic()))
            beat += 1
            await anyio.sleep(self.settings.heartbeat_interval_s)

    def _live_peers(self) -> list[NodeId]:
        return [c.node_id for c in self.election.peers(time.monotonic())]

    async def _control(self, tg: TaskGroup) -> None:
        """Each tick: apply the election's decision, then ask the master for anything missing."""
        while True:
            now = time.monotonic()
            own = Candidate(
                node_id=self.node_id,
                term=self.replica.state.term,
                last_index=self.replica.state.last_index,
                force_master=self.settings.force_master,
                is_master=self.is_master,
                heard_at=now,
            )
            decision = self.election.decide(own, now)
            if decision.is_self and self._master is None:
                term = next_term(self.election.peers(now), self.replica.state.term)
                await tg.start(self._run_master, term)
            elif not decision.is_self and self._master_scope is not None:
                log.warning("stepping down: %s is master now", decision.master)
                self._master_scope.cancel()
            if decision.master != self._followed:
                if decision.master is not None:
                    log.info("following master %s", decision.master)
                self._followed = decision.master
            self.replica.follow(None if decision.is_self else decision.master)
            request = self.replica.next_request(now)
            if request is not None and self.replica.master is not None:
                await self._send(self.replica.master, request)
            await anyio.sleep(self.settings.tick_s)

    async def _run_master(self, term: int, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        assert self._transport is not None
        master = Master(
            self.node_id,
            MasterSettings(
                node_timeout_s=self.settings.node_timeout_s,
                profile_update_interval_s=self.settings.profile_update_interval_s,
            ),
            self.replica,
            self,
        )
        with anyio.CancelScope() as scope:
            self._master, self._master_scope = master, scope
            self.replica.follow(None)
            task_status.started()
            try:
                await master.run(term)
            except Exception:
                # Top of the role: a failing master steps down (the election then picks again) instead of
                # taking the node, its replica and its API down with it.
                log.exception("master role failed in term %d; stepping down", term)
            finally:
                self._master, self._master_scope = None, None

    # --- messages --------------------------------------------------------------------------------------

    async def broadcast(self, message: WireMessage) -> None:
        await self._broadcast(message)

    async def send(self, node_id: NodeId, message: WireMessage) -> None:
        await self._send(node_id, message)

    async def _broadcast(self, message: WireMessage) -> None:
        assert self._transport is not None
        await self._transport.publish(TOPIC, encode_wire_message(message))

    async def _send(self, node_id: NodeId, message: WireMessage) -> None:
        assert self._transport is not None
        await self._transport.send(node_id, TOPIC, encode_wire_message(message))

    async def _receive(self, subscription: Any) -> None:
        async for sender, payload in subscription:
            try:
                message = decode_wire_message(payload)
            except ValidationError as error:
                self._counters["undecodable"] += 1
                log.debug("undecodable message from %s: %s", sender, error)
                continue
            try:
                await self._handle(NodeId(sender), message)
            except Exception:
                # Top of the receive loop: one bad message must not stop the node.
                log.exception("failed to handle %s from %s", message.kind, sender)

    def _claims_other_sender(self, sender: NodeId, claimed: NodeId) -> bool:
        if claimed != sender:
            self._counters["spoofed_sender"] += 1
            log.debug("message from %s claims to come from %s", sender, claimed)
            return True
        return False

    async def _handle(self, sender: NodeId, message: WireMessage) -> None:
        now = time.monotonic()
        if isinstance(message, Heartbeat):
            if self._claims_other_sender(sender, message.node_id):
                return
            if sender == self.node_id and message.profile.started_at != self._profiles.started_at:
                self._counters["clashing_node_id"] += 1
                log.warning("another process uses this node's id %s (same identity key?): ignored", sender)
                return
            if sender != self.node_id:
                self.election.observe(
                    Candidate(
                        sender, message.term, message.last_index, message.force_master, message.is_master, now
                    )
                )
                self.replica.on_master_heartbeat(sender, message.last_index)
            if self._master is not None:
                self._master.submit(message)
        elif isinstance(message, IndexedEvent):
            self.replica.on_event(sender, message)
        elif isinstance(message, EventRange):
            self.replica.on_range(sender, message.events)
        elif isinstance(message, EventRangeRequest):
            if self._master is not None and not self._claims_other_sender(sender, message.requester):
                await self._send(sender, self._master.answer_range(message))
        elif isinstance(message, CommandEnvelope):
            if self._claims_other_sender(sender, message.origin):
                return
            if self._master is not None:
                self._master.submit(message)
            # A command sent to a node that is not (or no longer) master: the requester resends it to the
            # master it follows; its deadline bounds the wait.
        elif isinstance(message, CommandAccepted | CommandRejected):
            # Any member may answer (a master that was just replaced still answers what it decided);
            # command ids are random, so an answer only matches the command it was meant for.
            self._pending.resolve(message)
        elif isinstance(message, Ping):
            if not self._claims_other_sender(sender, message.node_id):
                await self._send(
                    sender, Pong(node_id=self.node_id, ping_id=message.ping_id, sent_at=message.sent_at)
                )
        elif isinstance(message, Pong) and not self._claims_other_sender(sender, message.node_id):
            self._links.on_pong(message, now)

    def _log_events(self, events: Sequence[IndexedEvent]) -> None:
        for event in events:
            log.info("%s", describe_event(event))


def banner(settings: NodeSettings, node_id: NodeId, has_secret: bool) -> str:
    secrecy = (
        "cluster key set: traffic is sealed with a secret only members hold"
        if has_secret
        else "no --cluster-key: traffic is authenticated by the cluster name only, not secret"
    )
    transport = settings.transport
    discovery = "multicast scouting on" if transport.multicast_scouting else "multicast off"
    return (
        f"shoal node {node_id} in cluster {settings.cluster_name!r}\n"
        f"  {secrecy}\n"
        f"  listen {', '.join(transport.listen)}; peers {', '.join(transport.connect) or 'none'}; {discovery}\n"
        f"  api http://{settings.api_host}:{settings.api_port}; data {settings.data_dir}; "
        f"node timeout {settings.node_timeout_s:g} s; heartbeat {settings.heartbeat_interval_s:g} s"
        + ("; --force-master" if settings.force_master else "")
    )


def run_node(settings: NodeSettings) -> int:
    """Load (or create) this node's identity, say who it is, and run until SIGINT/SIGTERM."""
    identity = load_or_create_identity(settings.data_dir)
    node_id = identity.node_id
    sealer = Sealer(settings.cluster_key, settings.cluster_name, node_id)
    profiles = ProfileGatherer(
        node_id,
        settings.data_dir / "models",
        ApiAddress(host=settings.api_host, port=settings.api_port),
        time.time(),
    )
    print(banner(settings, node_id, sealer.has_secret), file=sys.stderr, flush=True)
    node = Node(settings, node_id, sealer, profiles)
    anyio.run(node.run)
    return 0

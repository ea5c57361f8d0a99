"""`shoal node`: wires identity, transport, election, the master role, the replica, the worker (runner
subprocesses), the task router (generation requests this node holds) and the HTTP API.

Inputs: `NodeSettings` (`shoal.node_settings`, built by the CLI; `shoal.node_main.run_node` starts a node) and frames from the cluster. Outputs: heartbeats, commands and
range requests to the cluster; the master role's events and replies while this node is elected; the HTTP
API; one log line per applied event.

Every message travels on one topic, `cluster`: broadcasts under `all/cluster`, directed messages under
`to/<node id>/cluster`. The transport delivers a node's own frames too, so a node that is its own master
sends itself commands and replies by the same path as everyone else.

Invariants: the master role runs only while this node's election says so, in its own cancel scope; a
master role that fails steps down and sits out a growing backoff (not eligible in its heartbeats); a
message that fails to decode, or claims another sender than the one that sealed it, is counted and dropped;
one task group owns every task and one `finally` closes the transport and the log.

Clashing ids: a node listens before it sends anything. If it hears a heartbeat under its own id from
another process (a copied data directory), it stays silent for good — its frames would displace the
original's in every receiver's replay window — and says so in its log, `/health` and `/state`. A clash
heard later (two copies started at once) is counted, logged and shown the same way.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Sequence
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
from shoal.master.master import Master, MasterSettings
from shoal.net.sealing import Sealer
from shoal.net.transport import Transport
from shoal.node_commands import CommandSender
from shoal.node_guards import MessageDrops, RoleBackoff
from shoal.node_links import LinkProber
from shoal.node_log import describe_event
from shoal.node_settings import NodeSettings
from shoal.replica import Replica
from shoal.task_router import RouterSettings, TaskRouter
from shoal.types import (
    Command,
    CommandAccepted,
    CommandBatch,
    CommandRejected,
    EventBatch,
    EventRange,
    EventRangeRequest,
    Heartbeat,
    IndexedEvent,
    NodeId,
    Ping,
    Pong,
    ReplyBatch,
    State,
    WireMessage,
    decode_wire_message,
    encode_wire_message,
)
from shoal.types.generation import CancelGeneration, GenerationChunks, StartGeneration
from shoal.worker.downloads import Downloader, DownloadSettings
from shoal.worker.profile import ProfileGatherer
from shoal.worker.worker import Worker, WorkerSettings

log = logging.getLogger("shoal.node")

TOPIC = "cluster"
PEER_WAIT_S = 10.0  # longest a node with --peer endpoints waits for a connection before it speaks
# Sent to this node itself: delivered in-process (see `_send`).
LOCAL_MESSAGES = (StartGeneration, CancelGeneration, GenerationChunks)
CommandReply = CommandAccepted | CommandRejected


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
        self._commands = CommandSender(node_id, settings.command_timeout_s, lambda: self._followed)
        self._drops = MessageDrops()
        self._backoff = RoleBackoff()
        self._first_peer_heard_at: float | None = None
        self._spoke = False  # sent a frame yet: until then a heartbeat under our id proves a clash
        self._listening = True  # the quiet start: answer nothing (not even pings) until it is over
        self.quarantined = False
        self.identity_clash: dict[str, Any] | None = None
        self.downloader = Downloader(
            DownloadSettings(settings.models_dir, endpoint=settings.hub_endpoint, offline=settings.offline)
        )
        self.router = TaskRouter(
            node_id,
            RouterSettings(first_chunk_timeout_s=settings.first_chunk_timeout_s),
            lambda: self.replica.state,
            self._send,
        )
        self.worker = Worker(
            node_id,
            WorkerSettings(
                data_dir=settings.data_dir,
                runner_threads=settings.runner_threads,
                compile_decode=settings.compile_decode,
                deadlines=settings.runner_deadlines,
            ),
            lambda: self.replica.state,
            self.submit,
            self._send,
        )

    # --- what the API sees -------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.replica.state

    @property
    def models_dir(self) -> Path:
        return self.settings.models_dir

    @property
    def is_master(self) -> bool:
        return self._master is not None

    def diagnostics(self) -> dict[str, Any]:
        drops = self._transport.drops.snapshot() if self._transport is not None else {}
        role = "quarantined" if self.quarantined else "master" if self.is_master else "follower"
        return {
            "node_id": self.node_id,
            "role": role,
            "identity_clash": self.identity_clash,
            "master": self._followed,
            "term": self.replica.state.term,
            "cluster": self.settings.cluster_name,
            "cluster_key_secret": self._sealer.has_secret,
            "dropped_frames": drops,
            "dropped_frames_total": sum(drops.values()),
            "dropped_messages": dict(self._drops.counts),
            "dropped_messages_total": self._drops.total,
            "commands_rejected": self._commands.num_rejected,
            "commands_timed_out": self._commands.num_timed_out,
            "master_rejected_commands": self._master.num_rejected_commands if self._master else 0,
            "master_role_failures": self._backoff.num_failures_total,
            "eligible_for_master": self._backoff.eligible(time.monotonic()),
            "replica_rejected_events": self.replica.num_rejected_events,
            "replica_truncations": self.replica.num_truncations,
            "link_rtts_ms": self._links.rtts_ms(),
            "sse_listeners_cut_off": self.feed.num_cut_off,
            "tasks_in_flight_here": sum(self.router.in_flight.values()),
            "chunks_from_foreign_nodes": self.router.num_foreign_chunks,
            "worker": self.worker.diagnostics(),
        }

    def read_events(self, first: int, last: int) -> Sequence[IndexedEvent]:
        return self.replica.read_range(first, last)

    def listen_events(self) -> MemoryObjectReceiveStream[IndexedEvent]:
        return self.feed.listen()

    async def submit(self, command: Command) -> CommandReply | None:
        """Send `command` to the master, resending while the master changes; None if no answer in time."""
        if self.quarantined:
            return None
        return await self._commands.submit(command)

    # --- running -----------------------------------------------------------------------------------------

    async def run(self, api_socket: socket.socket) -> None:
        transport = await Transport.open(self.settings.transport, self._sealer)
        self._transport = transport
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(self, self.settings.command_timeout_s, self.settings.api_key),
                log_level="warning",
                lifespan="off",
            )
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stop_on_signal, tg)
                tg.start_soon(self._serve_api, server, api_socket)
                tg.start_soon(self._receive, transport.subscribe(TOPIC))
                tg.start_soon(self._receive, transport.subscribe_direct(TOPIC))
                await self._listen_before_speaking(transport)
                if self.quarantined:
                    return  # the API and the receive loops stay up, so the clash can be seen
                self._listening = False
                self.election.settle_from(time.monotonic())
                tg.start_soon(self._commands.run, self._send)
                tg.start_soon(self._heartbeats)
                tg.start_soon(self._control, tg)
                tg.start_soon(self.worker.run)
                tg.start_soon(self.downloader.run)
        finally:
            server.should_exit = True
            self.feed.close()
            with anyio.CancelScope(shield=True):
                await transport.close()
            self.replica.close()
            log.info("node %s stopped", self.node_id)

    async def _listen_before_speaking(self, transport: Transport) -> None:
        """Hear the cluster before this node's first frame, long enough to hear a heartbeat under our own
        id if another process has it: `quiet_s`, and while peers are connected, until a heartbeat from one
        of them shows that frames reach us, plus one more heartbeat interval (at most 6 x `quiet_s`, and at
        least `quiet_s` after the first connection; with --peer endpoints, up to PEER_WAIT_S for it)."""
        interval = self.settings.heartbeat_interval_s
        configured_peers = bool(self.settings.transport.connect)
        started = time.monotonic()
        connected_at: float | None = None
        while not self.quarantined:
            now = time.monotonic()
            if connected_at is None and transport.peers():
                connected_at = now
            if connected_at is None:
                # --peer endpoints can take longer than quiet_s to connect on a busy machine; speaking
                # before they do would let a copied identity go unnoticed. Connecting needs no one to speak.
                waited_enough = now - started >= (PEER_WAIT_S if configured_peers else self.settings.quiet_s)
                if waited_enough:
                    return  # alone: nobody to clash with
                await anyio.sleep(0.05)
                continue
            if now - started >= 6 * self.settings.quiet_s and now - connected_at >= self.settings.quiet_s:
                return
            if now - started >= self.settings.quiet_s:
                heard = self._first_peer_heard_at
                if heard is not None and now - heard >= 1.5 * interval:
                    return
            await anyio.sleep(0.05)

    async def _serve_api(self, server: uvicorn.Server, api_socket: socket.socket) -> None:
        # uvicorn installs no signal handlers when served this way; the node owns SIGINT/SIGTERM.
        await server.serve(sockets=[api_socket])

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
                    eligible=self._backoff.eligible(time.monotonic()),
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
                eligible=self._backoff.eligible(now),
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
        started = time.monotonic()
        with anyio.CancelScope() as scope:
            self._master, self._master_scope = master, scope
            self.replica.follow(None)
            task_status.started()
            try:
                await master.run(term)
            except Exception:
                # Top of the role: a failing master steps down and sits out a growing pause (its heartbeats
                # say it is not eligible), so another node takes the role instead of this one crashing in
                # a loop; the node, its replica and its API stay up.
                pause = self._backoff.failed(started, time.monotonic())
                log.exception(
                    "master role failed in term %d (%d in a row); stepping down, not eligible for %.0f s",
                    term,
                    self._backoff.num_failures,
                    pause,
                )
            finally:
                self._master, self._master_scope = None, None

    # --- messages --------------------------------------------------------------------------------------

    async def broadcast(self, message: WireMessage) -> None:
        await self._broadcast(message)

    async def send(self, node_id: NodeId, message: WireMessage) -> None:
        await self._send(node_id, message)

    async def _broadcast(self, message: WireMessage) -> None:
        assert self._transport is not None
        self._spoke = True
        await self._transport.publish(TOPIC, encode_wire_message(message))

    async def _send(self, node_id: NodeId, message: WireMessage) -> None:
        if node_id == self.node_id and isinstance(message, LOCAL_MESSAGES):
            # A generation task of this node's own instance: handed over in-process, not through the
            # transport (a request's first token and every chunk would otherwise cross it twice).
            await self._handle(node_id, message)
            return
        assert self._transport is not None
        self._spoke = True
        await self._transport.send(node_id, TOPIC, encode_wire_message(message))

    async def _receive(self, subscription: Any) -> None:
        async for sender, payload in subscription:
            try:
                message = decode_wire_message(payload)
            except ValidationError as error:
                self._drops.count("undecodable", sender, str(error))
                continue
            try:
                await self._handle(NodeId(sender), message)
            except Exception:
                # Top of the receive loop: one bad message must not stop the node.
                log.exception("failed to handle %s from %s", message.kind, sender)

    def _claims_other_sender(self, sender: NodeId, claimed: NodeId) -> bool:
        if claimed != sender:
            self._drops.count("spoofed_sender", sender, f"{claimed!r} in a frame sealed by {sender!r}")
            return True
        return False

    def _on_clash(self, heartbeat: Heartbeat) -> None:
        profile = heartbeat.profile
        self.identity_clash = {
            "other_hostname": profile.hostname,
            "other_api": f"{profile.api_address.host}:{profile.api_address.port}",
            "other_started_at": profile.started_at,
        }
        self._drops.count("clashing_node_id", heartbeat.node_id, "a heartbeat under this node's id")
        if not self._spoke and not self.quarantined:
            self.quarantined = True
            log.error(
                "node id %s is already in use by a node on %s (api %s): this process copied its identity "
                "(data dir %s). It stays silent so the other node keeps working; stop it and give it its own "
                "--data-dir",
                self.node_id,
                profile.hostname,
                self.identity_clash["other_api"],
                self.settings.data_dir,
            )

    def _heard_events(self, sender: NodeId, events: Sequence[IndexedEvent], now: float) -> None:
        """Events from the master this node follows: it is master, whatever its last heartbeat said (see
        shoal.election)."""
        if events and sender == self.replica.master:
            self.election.observe_master(sender, max(e.index for e in events), now)

    async def _handle(self, sender: NodeId, message: WireMessage) -> None:
        now = time.monotonic()
        if isinstance(message, Heartbeat):
            if self._claims_other_sender(sender, message.node_id):
                return
            if sender == self.node_id and message.profile.started_at != self._profiles.started_at:
                self._on_clash(message)
                return
            if sender != self.node_id and self._first_peer_heard_at is None:
                self._first_peer_heard_at = now
        if self.quarantined:
            return
        if isinstance(message, Heartbeat):
            if sender != self.node_id:
                self.election.observe(
                    Candidate(
                        sender,
                        message.term,
                        message.last_index,
                        message.force_master,
                        message.is_master,
                        now,
                        message.eligible,
                    )
                )
                self.replica.on_master_heartbeat(sender, message.last_index)
            if self._master is not None:
                self._master.submit(message)
        elif isinstance(message, EventBatch):
            self._heard_events(sender, message.events, now)
            self.replica.on_events(sender, message.events)
        elif isinstance(message, EventRange):
            self._heard_events(sender, message.events, now)
            self.replica.on_range(sender, message.events)
        elif isinstance(message, EventRangeRequest):
            if self._master is not None and not self._claims_other_sender(sender, message.requester):
                await self._send(sender, self._master.answer_range(message))
        elif isinstance(message, CommandBatch):
            for envelope in message.commands:
                # A command sent to a node that is not (or no longer) master is dropped here: the
                # requester resends it to the master it follows, and its deadline bounds the wait.
                if not self._claims_other_sender(sender, envelope.origin) and self._master is not None:
                    self._master.submit(envelope)
        elif isinstance(message, ReplyBatch):
            for reply in message.replies:
                self._commands.resolve(reply)
        elif isinstance(message, Ping):
            # Peers ping every id they hear, so a copied identity would answer the original's pings (and
            # so speak) before it could hear the original's heartbeat.
            if not self._listening and not self._claims_other_sender(sender, message.node_id):
                await self._send(
                    sender, Pong(node_id=self.node_id, ping_id=message.ping_id, sent_at=message.sent_at)
                )
        elif isinstance(message, Pong):
            if not self._claims_other_sender(sender, message.node_id):
                self._links.on_pong(message, now)
        elif isinstance(message, StartGeneration):
            if not self._claims_other_sender(sender, message.origin):
                await self.worker.on_start(message)
        elif isinstance(message, CancelGeneration):
            if not self._claims_other_sender(sender, message.origin):
                self.worker.on_cancel(message)
        elif isinstance(message, GenerationChunks):
            self.router.on_chunks(sender, message)

    def _log_events(self, events: Sequence[IndexedEvent]) -> None:
        for event in events:
            log.info("%s", describe_event(event))

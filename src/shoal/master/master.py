"""The master role: the only writer of the cluster's event log, active on the elected node only.

Inputs (through `submit`): command envelopes from any node, and every node's heartbeats.
Outputs: IndexedEvents appended to this node's log (through its Replica) and broadcast; a CommandAccepted or
CommandRejected for every command, sent to the node that asked.

Invariants:
- the first event it writes is MasterElected under its term; every later event carries that term;
- indices are contiguous: it continues from its own replica's last index (it was elected because it had the
  most complete log among live nodes), so nothing placed before a master change is dropped;
- a batch is validated against the state including the batch's own earlier events, persisted, broadcast,
  and only then answered;
- a command id seen recently gets the same answer again (requesters retry while the master changes); the
  events a command produced carry its id, so a new master rebuilds these answers from its log's tail and
  a command resent across a master change is not applied twice;
- one round (everything that arrived while the last was written) is one log append, one broadcast frame
  (EventBatch) and one reply frame per requesting node: costs per round, not per command;
- a node silent for longer than `node_timeout_s` is declared NodeTimedOut once, and every instance with a
  shard on it is deleted with it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from shoal.master.commands import Rejection, decide
from shoal.master.health import membership_events, silent_nodes
from shoal.master.instance_commands import instances_lost_with_node
from shoal.replica import Replica
from shoal.state import apply
from shoal.types import (
    CommandAccepted,
    CommandEnvelope,
    CommandId,
    CommandRejected,
    Event,
    EventBatch,
    EventIndex,
    EventRange,
    EventRangeRequest,
    Heartbeat,
    IndexedEvent,
    MasterElected,
    NodeId,
    NodeTimedOut,
    ReplyBatch,
    State,
    Term,
    WireMessage,
)
from shoal.types.messages import MAX_COMMANDS_PER_BATCH, MAX_EVENTS_PER_RANGE

log = logging.getLogger(__name__)

MasterInput = CommandEnvelope | Heartbeat
CommandReply = CommandAccepted | CommandRejected

MAX_BATCH = 1_000
INBOX_SIZE = 10_000
REMEMBERED_REPLIES = 10_000
# Log tail a new master reads back for the answers to recent commands (requesters give up after seconds).
REBUILT_REPLIES_TAIL = 2_000
EVENTS_PER_FRAME = 256  # bounds a broadcast frame (profiles are the largest events, ~2 KB each)


class Outbox(Protocol):
    async def broadcast(self, message: WireMessage) -> None: ...

    async def send(self, node_id: NodeId, message: WireMessage) -> None: ...


@dataclass(frozen=True)
class MasterSettings:
    node_timeout_s: float
    profile_update_interval_s: float
    tick_s: float = 0.1


class _Batch:
    """Events decided in one round, indexed and folded into a provisional state as they are added."""

    def __init__(self, state: State, term: int) -> None:
        self.state = state
        self.term = term
        self.events: list[IndexedEvent] = []
        self.replies: list[tuple[NodeId, CommandReply]] = []

    @property
    def next_index(self) -> int:
        return self.state.last_index + 1

    def add(self, events: list[Event], command_id: CommandId | None = None) -> None:
        for event in events:
            indexed = IndexedEvent(
                index=EventIndex(self.next_index),
                term=Term(self.term),
                timestamp=time.time(),
                event=event,
                command_id=command_id,
            )
            self.state = apply(self.state, indexed)
            self.events.append(indexed)


class Master:
    """One activation of the master role; `run` until cancelled (the node cancels it on step-down)."""

    def __init__(
        self,
        node_id: NodeId,
        settings: MasterSettings,
        replica: Replica,
        outbox: Outbox,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self._settings = settings
        self._replica = replica
        self._outbox = outbox
        self._clock = clock
        self._send: MemoryObjectSendStream[MasterInput]
        self._receive: MemoryObjectReceiveStream[MasterInput]
        self._send, self._receive = anyio.create_memory_object_stream[MasterInput](INBOX_SIZE)
        self._last_heard: dict[NodeId, float] = {}
        self._last_profile_event: dict[NodeId, float] = {}
        self._replies: OrderedDict[CommandId, CommandReply] = OrderedDict()
        self.term = 0
        self.num_rejected_commands = 0
        self.num_inbox_overflows = 0

    def submit(self, item: MasterInput) -> None:
        """Hand a command or heartbeat to the role (never blocks; a full inbox drops and counts)."""
        try:
            self._send.send_nowait(item)
        except anyio.WouldBlock:
            self.num_inbox_overflows += 1

    def answer_range(self, request: EventRangeRequest) -> EventRange:
        last = min(request.last_index, request.first_index + MAX_EVENTS_PER_RANGE - 1)
        return EventRange(events=tuple(self._replica.read_range(request.first_index, last)))

    async def run(self, term: int) -> None:
        self.term = term
        self._rebuild_replies()
        now = self._clock()
        # Nodes the state says are active get a full timeout from now to be heard by this master.
        self._last_heard = dict.fromkeys(self._replica.state.active_node_ids(), now)
        batch = _Batch(self._replica.state, term)
        batch.add([MasterElected(node_id=self.node_id, term=Term(term))])
        await self._finish(batch)
        log.info("master for term %d from index %d", term, batch.state.last_index)
        try:
            while True:
                items = await self._receive_batch()
                batch = _Batch(self._replica.state, term)
                for item in items:
                    if isinstance(item, CommandEnvelope):
                        self._handle_command(batch, item)
                    else:
                        self._handle_heartbeat(batch, item)
                self._check_timeouts(batch)
                await self._finish(batch)
        finally:
            self._send.close()
            self._receive.close()

    def _rebuild_replies(self) -> None:
        """Answers to the commands in this node's log tail (a previous master accepted them)."""
        last = self._replica.last_index
        ranges: dict[CommandId, tuple[int, int]] = {}
        for event in self._replica.read_range(max(1, last - REBUILT_REPLIES_TAIL + 1), last):
            if event.command_id is not None:
                first, _ = ranges.get(event.command_id, (event.index, event.index))
                ranges[event.command_id] = (first, event.index)
        for command_id, (first, last_of_command) in ranges.items():
            self._remember(
                CommandAccepted(
                    command_id=command_id,
                    first_index=EventIndex(first),
                    last_index=EventIndex(last_of_command),
                )
            )

    def _remember(self, reply: CommandReply) -> None:
        self._replies[reply.command_id] = reply
        while len(self._replies) > REMEMBERED_REPLIES:
            self._replies.popitem(last=False)

    async def _receive_batch(self) -> list[MasterInput]:
        items: list[MasterInput] = []
        with anyio.move_on_after(self._settings.tick_s):
            items.append(await self._receive.receive())
        while len(items) < MAX_BATCH:
            try:
                items.append(self._receive.receive_nowait())
            except anyio.WouldBlock:
                break
        return items

    def _handle_command(self, batch: _Batch, envelope: CommandEnvelope) -> None:
        remembered = self._replies.get(envelope.command_id)
        if remembered is not None:
            batch.replies.append((envelope.origin, remembered))
            return
        result = decide(batch.state, envelope.command)
        reply: CommandReply
        if isinstance(result, Rejection):
            self.num_rejected_commands += 1
            log.info("rejected command %s from %s: %s", envelope.command_id, envelope.origin, result.reason)
            reply = CommandRejected(command_id=envelope.command_id, reason=result.reason)
        else:
            first = batch.next_index
            batch.add(result, envelope.command_id)
            reply = CommandAccepted(
                command_id=envelope.command_id,
                first_index=EventIndex(first),
                last_index=EventIndex(batch.next_index - 1),
            )
        self._remember(reply)
        batch.replies.append((envelope.origin, reply))

    def _handle_heartbeat(self, batch: _Batch, heartbeat: Heartbeat) -> None:
        now = self._clock()
        self._last_heard[heartbeat.node_id] = now
        events = membership_events(
            batch.state,
            heartbeat.profile,
            self._last_profile_event.get(heartbeat.node_id),
            now,
            self._settings.profile_update_interval_s,
        )
        if events:
            self._last_profile_event[heartbeat.node_id] = now
            batch.add(events)

    def _check_timeouts(self, batch: _Batch) -> None:
        now = self._clock()
        for node_id in silent_nodes(batch.state, self._last_heard, now, self._settings.node_timeout_s):
            del self._last_heard[node_id]
            # The instances it held cannot serve any more: delete them, so their runners elsewhere stop.
            batch.add(
                [NodeTimedOut(node_id=node_id), *instances_lost_with_node(batch.state.instances, node_id)]
            )

    async def _finish(self, batch: _Batch) -> None:
        """Persist, broadcast, then answer: a requester never hears of an event before it is durable."""
        if batch.events:
            self._replica.commit(batch.events)
            for start in range(0, len(batch.events), EVENTS_PER_FRAME):
                chunk = tuple(batch.events[start : start + EVENTS_PER_FRAME])
                await self._outbox.broadcast(EventBatch(events=chunk))
        by_origin: dict[NodeId, list[CommandReply]] = {}
        for origin, reply in batch.replies:
            by_origin.setdefault(origin, []).append(reply)
        for origin, replies in by_origin.items():
            for start in range(0, len(replies), MAX_COMMANDS_PER_BATCH):
                chunk_of_replies = tuple(replies[start : start + MAX_COMMANDS_PER_BATCH])
                await self._outbox.send(origin, ReplyBatch(replies=chunk_of_replies))

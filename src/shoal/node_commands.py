"""Commands this node submits to the master, coalesced into CommandBatch frames, and their replies.

Inputs: `submit(command)` from the API (many at once), replies from the master (`resolve`). Output:
CommandBatch frames to the master the node follows, through `run(send)`. Every command the API received
while the previous frame was on its way goes out in the next frame: a burst costs a few frames, not one
per command. A command is resent under the same id while unanswered (the master answers a repeated id
with its first answer), until the deadline; then `submit` returns None.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from shoal.types import (
    Command,
    CommandAccepted,
    CommandBatch,
    CommandEnvelope,
    CommandId,
    CommandRejected,
    NodeId,
    new_command_id,
)
from shoal.types.messages import MAX_COMMANDS_PER_BATCH

CommandReply = CommandAccepted | CommandRejected
RESEND_S = 1.0
NO_MASTER_POLL_S = 0.05


class CommandSender:
    def __init__(self, node_id: NodeId, timeout_s: float, master: Callable[[], NodeId | None]) -> None:
        self.node_id = node_id
        self._timeout_s = timeout_s
        self._master = master
        self._answered: dict[CommandId, anyio.Event] = {}
        self._replies: dict[CommandId, CommandReply] = {}
        # Unbounded, yet bounded in practice: each waiting submit queues at most one copy per RESEND_S.
        self._queue_in: MemoryObjectSendStream[CommandEnvelope]
        self._queue_out: MemoryObjectReceiveStream[CommandEnvelope]
        self._queue_in, self._queue_out = anyio.create_memory_object_stream[CommandEnvelope](math.inf)
        self.num_rejected = 0
        self.num_timed_out = 0

    async def submit(self, command: Command) -> CommandReply | None:
        """The master's answer to `command`, or None when none came before the deadline."""
        envelope = CommandEnvelope(command_id=new_command_id(), origin=self.node_id, command=command)
        answered = anyio.Event()
        self._answered[envelope.command_id] = answered
        try:
            with anyio.move_on_after(self._timeout_s):
                while not answered.is_set():
                    if self._master() is None:
                        await anyio.sleep(NO_MASTER_POLL_S)
                        continue
                    self._queue_in.send_nowait(envelope)
                    with anyio.move_on_after(RESEND_S):
                        await answered.wait()
        finally:
            self._answered.pop(envelope.command_id, None)
        reply = self._replies.pop(envelope.command_id, None)
        if reply is None:
            self.num_timed_out += 1
        elif isinstance(reply, CommandRejected):
            self.num_rejected += 1
        return reply

    def resolve(self, reply: CommandReply) -> None:
        """A reply from any member (a just-replaced master still answers what it decided); ids are random,
        so a reply only matches the command it was meant for. Replies nobody waits for are ignored."""
        answered = self._answered.get(reply.command_id)
        if answered is not None and not answered.is_set():
            self._replies[reply.command_id] = reply
            answered.set()

    def _waiting(self, command_id: CommandId) -> bool:
        answered = self._answered.get(command_id)
        return answered is not None and not answered.is_set()

    async def run(self, send: Callable[[NodeId, CommandBatch], Awaitable[None]]) -> None:
        async for first in self._queue_out:
            commands = [first]
            while len(commands) < MAX_COMMANDS_PER_BATCH:
                try:
                    commands.append(self._queue_out.receive_nowait())
                except anyio.WouldBlock:
                    break
            pending = [c for c in commands if self._waiting(c.command_id)]
            master = self._master()
            if pending and master is not None:
                # (no master: the waiting submits queue their commands again once there is one)
                await send(master, CommandBatch(commands=tuple(pending)))

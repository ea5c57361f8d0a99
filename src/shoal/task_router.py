"""The API side of generation tasks: the node that holds an HTTP request sends it to an instance and
receives its chunks point-to-point (never through the event log).

Inputs: `generate(instance, prompt, params)` from the API; `on_chunks(sender, frame)` from the transport.
Outputs: StartGeneration to the instance's rank-0 node (and to its sampling node, which must know where
to send the chunks), CancelGeneration when the caller stops listening before the end.

Invariants: a task's stream always ends — with its last chunk, an error chunk from any node of the
instance (a runner died), an error when the instance leaves the state (deleted, or its node timed out),
or an error when no chunk came before `first_chunk_timeout_s`. Chunks are accepted only from nodes of the
task's instance. `in_flight` counts this node's tasks per instance (routing prefers the least loaded).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from shoal.types import NodeId, State, WireMessage
from shoal.types.generation import (
    CancelGeneration,
    GenerationChunk,
    GenerationChunks,
    GenerationParams,
    Prompt,
    StartGeneration,
    ToolSpec,
)
from shoal.types.instance_ids import InstanceId, TaskId, new_task_id
from shoal.types.instances import Instance

STATE_POLL_S = 0.25


@dataclass(frozen=True, slots=True)
class RouterSettings:
    first_chunk_timeout_s: float = 60.0


@dataclass(eq=False, slots=True)
class _Task:
    instance: Instance
    send: MemoryObjectSendStream[GenerationChunk]


class TaskRouter:
    def __init__(
        self,
        node_id: NodeId,
        settings: RouterSettings,
        state: Callable[[], State],
        send: Callable[[NodeId, WireMessage], Awaitable[None]],
    ) -> None:
        self.node_id = node_id
        self._settings = settings
        self._state = state
        self._send = send
        self._tasks: dict[TaskId, _Task] = {}
        self.in_flight: Counter[InstanceId] = Counter()
        self.num_foreign_chunks = 0

    def on_chunks(self, sender: NodeId, frame: GenerationChunks) -> None:
        task = self._tasks.get(frame.task_id)
        if task is None:
            return  # a task that already ended here (e.g. a late chunk after an error)
        if sender not in task.instance.node_ids:
            self.num_foreign_chunks += 1
            return
        for chunk in frame.chunks:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                task.send.send_nowait(chunk)

    async def generate(
        self,
        instance: Instance,
        prompt: Prompt,
        params: GenerationParams,
        tools: tuple[ToolSpec, ...] = (),
        keepalive_s: float | None = None,
    ) -> AsyncGenerator[GenerationChunk | None, None]:
        """The task's chunks, ending with its last one (finish_reason or error). With `keepalive_s`, a None
        after every `keepalive_s` without a chunk (so a stream can send keep-alives while a prompt runs)."""
        task_id = new_task_id()
        send, receive = anyio.create_memory_object_stream[GenerationChunk](math.inf)
        self._tasks[task_id] = _Task(instance, send)
        self.in_flight[instance.instance_id] += 1
        finished = False
        try:
            start = StartGeneration(
                task_id=task_id,
                instance_id=instance.instance_id,
                origin=self.node_id,
                prompt=prompt,
                params=params,
                tools=tools,
            )
            rank0, sampler = _rank0_node(instance), _sampling_node(instance)
            if sampler != rank0:
                await self._send(sampler, start)  # first, so it knows the route before chunks exist
            await self._send(rank0, start)
            deadline = anyio.current_time() + self._settings.first_chunk_timeout_s
            first = True
            while True:
                tick = anyio.current_time() + keepalive_s if keepalive_s is not None else math.inf
                chunk = await self._next(receive, instance.instance_id, deadline if first else math.inf, tick)
                if chunk is None:
                    yield None
                    continue
                first = False
                finished = chunk.is_last
                yield chunk
                if finished:
                    return
        finally:
            self._tasks.pop(task_id, None)
            self.in_flight[instance.instance_id] -= 1
            if self.in_flight[instance.instance_id] <= 0:
                del self.in_flight[instance.instance_id]
            send.close()
            receive.close()
            if not finished:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                    await self._cancel(task_id, instance)

    async def _next(
        self,
        receive: anyio.abc.ObjectReceiveStream[GenerationChunk],
        instance_id: InstanceId,
        deadline: float,
        tick: float = math.inf,
    ) -> GenerationChunk | None:
        """The next chunk; None when `tick` passes first."""
        while True:
            until = min(deadline, tick)
            with anyio.move_on_after(min(STATE_POLL_S, max(0.0, until - anyio.current_time()))):
                return await receive.receive()
            if instance_id not in self._state().instances:
                return GenerationChunk(
                    error=f"instance {instance_id} was deleted while serving this request",
                    error_kind="unavailable",
                )
            if anyio.current_time() >= deadline:
                return GenerationChunk(
                    error=f"no output from instance {instance_id} within "
                    f"{self._settings.first_chunk_timeout_s:g} s",
                    error_kind="unavailable",
                )
            if anyio.current_time() >= tick:
                return None

    async def _cancel(self, task_id: TaskId, instance: Instance) -> None:
        cancel = CancelGeneration(task_id=task_id, instance_id=instance.instance_id, origin=self.node_id)
        await self._send(_rank0_node(instance), cancel)


def _rank0_node(instance: Instance) -> NodeId:
    return instance.shards[0].node_id


def _sampling_node(instance: Instance) -> NodeId:
    return instance.shards[-1].node_id if instance.sharding == "pipeline" else instance.shards[0].node_id

"""The runner supervisor: one runner subprocess per local shard, its status, its tasks, its end.

Inputs: `spawn(spec)`, `submit(runner_id, task)`, `cancel(task_id)`, `shutdown(runner_id)`,
`fail(runner_id, reason)`, `forget(runner_id)` from the node's worker (which decides with worker/plan.py).
Outputs: each runner's status (`status`, `runners()` as plan's `LocalRunner`s with `status_since`, and
`subscribe_status()` streams of changes); each submitted task's chunks on the `TaskStream` that `submit`
returned (for a pipeline whose sampling rank runs on another node, that stream carries only errors and
ends with an empty end marker); chunks of tasks submitted elsewhere (a pipeline's last rank samples for
rank 0's node) on `subscribe_chunks()` streams.

Invariants:
- Every stage has a deadline (`StageDeadlines`); an overrun kills the process and fails the runner, naming
  the stage. A process exit of any kind is seen at once (EOF on its socket), the process is reaped, and
  the runner ends Shutdown (a requested stop, or one its group agreed on) or Failed (the reason it
  reported, or its exit code or signal).
- A stop asked of a runner that is still starting (not yet Ready) kills it at once and ends Shutdown: it
  holds no task and no state worth draining, and a runner blocked in its group's rendezvous or in a load
  would read the request only when that returns (a rank 0 in the rendezvous keeps the instance's port).
  A serving runner is asked to stop, so its group agrees on the stop; it is killed only at the
  shutting-down deadline.
- When a runner ends, every task in flight on its instance gets an error chunk at once; no stream hangs.
- Leaving the `async with` block shuts every runner down and reaps it: no process outlives the supervisor.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import TracebackType
from typing import TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from shoal.runner.messages import CancelTask, ChunkBatch, StatusReport, StopRunner, SubmitTask, TaskChunk
from shoal.runner.spec import RunnerSpec
from shoal.types.instance_ids import InstanceId, RunnerId, TaskId
from shoal.types.runners import (
    RunnerFailed,
    RunnerIdle,
    RunnerLoading,
    RunnerShutdown,
    RunnerShuttingDown,
    RunnerStatus,
    is_serving,
    is_starting,
)
from shoal.worker.plan import DEFAULT_DEADLINES, LocalRunner, StageDeadlines
from shoal.worker.runner_process import describe_exit, kill, reap, start_runner_process

_T = TypeVar("_T")
MAX_REASON = 2000
# After EOF the process is exiting; give it this long to finish before it is killed.
EXIT_GRACE_S = 2.0


class SupervisorError(Exception):
    """A call the supervisor cannot carry out (unknown runner, runner not serving, duplicate task)."""


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    deadlines: StageDeadlines = DEFAULT_DEADLINES
    python: str = sys.executable
    # Added to every runner's environment (e.g. GLOO_SOCKET_IFNAME; tests use it for fault injection).
    runner_env: Mapping[str, str] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _Runner:
    spec: RunnerSpec
    process: subprocess.Popen[bytes]
    conn: Connection
    status: RunnerStatus
    status_since: float
    changed: anyio.Event = field(default_factory=anyio.Event)
    exited: anyio.Event = field(default_factory=anyio.Event)
    stop_requested: bool = False
    stopped_while_starting: bool = False  # killed by a stop request before it served (ends Shutdown)
    kill_reason: str | None = None


@dataclass(eq=False, slots=True)
class _Task:
    runner_id: RunnerId
    instance_id: InstanceId
    send: MemoryObjectSendStream[TaskChunk]


class TaskStream:
    """The chunks of one task, ending after its last chunk (finished, or an error)."""

    def __init__(self, task_id: TaskId, receive: MemoryObjectReceiveStream[TaskChunk]) -> None:
        self.task_id = task_id
        self._receive = receive
        self._done = False

    def __aiter__(self) -> TaskStream:
        return self

    async def __anext__(self) -> TaskChunk:
        if self._done:
            raise StopAsyncIteration
        try:
            chunk = await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
        if chunk.is_last:
            self._done = True
            self._receive.close()
        return chunk

    def close(self) -> None:
        """Stop listening (the task itself keeps running: `cancel` it to stop it)."""
        self._done = True
        self._receive.close()


class RunnerSupervisor:
    def __init__(self, config: SupervisorConfig | None = None) -> None:
        self.config = config or SupervisorConfig()
        self._runners: dict[RunnerId, _Runner] = {}
        self._tasks: dict[TaskId, _Task] = {}
        # Tasks submitted on another node whose chunks pass through here, by instance (to fail them too).
        self._relayed: dict[TaskId, InstanceId] = {}
        self._status_subscribers: list[MemoryObjectSendStream[tuple[RunnerId, RunnerStatus]]] = []
        self._chunk_subscribers: list[MemoryObjectSendStream[TaskChunk]] = []
        self._task_group: TaskGroup | None = None

    async def __aenter__(self) -> RunnerSupervisor:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._task_group is not None
        try:
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as group:
                    for runner_id, runner in self._runners.items():
                        if not runner.exited.is_set():
                            group.start_soon(self.shutdown, runner_id, "the supervisor is stopping")
        finally:
            for runner in self._runners.values():  # whatever happened above, no process is left behind
                kill(runner.process)
                runner.process.wait()
                runner.conn.close()
            self._task_group.cancel_scope.cancel()
            await self._task_group.__aexit__(exc_type, exc, tb)
        return None

    # --- runners -------------------------------------------------------------------------------------

    async def spawn(self, spec: RunnerSpec, env: Mapping[str, str] | None = None) -> None:
        """Start the runner; `env` adds to the configured runner environment (e.g. GLOO_SOCKET_IFNAME)."""
        if self._task_group is None:
            raise SupervisorError("use the supervisor inside `async with`")
        if spec.runner_id in self._runners:
            raise SupervisorError(f"runner {spec.runner_id} already exists; forget it first")
        process, conn = start_runner_process(
            spec, self.config.python, {**self.config.runner_env, **(env or {})}
        )
        runner = _Runner(spec, process, conn, RunnerIdle(), time.monotonic())
        self._runners[spec.runner_id] = runner
        self._publish_status(spec.runner_id, runner.status)
        self._task_group.start_soon(self._read, spec.runner_id, runner)
        self._task_group.start_soon(self._enforce_deadlines, spec.runner_id, runner)

    def spec(self, runner_id: RunnerId) -> RunnerSpec:
        return self._get(runner_id).spec

    def has_exited(self, runner_id: RunnerId) -> bool:
        """Whether the runner's process has ended and been reaped (then it may be forgotten)."""
        return self._get(runner_id).exited.is_set()

    def status(self, runner_id: RunnerId) -> RunnerStatus:
        return self._get(runner_id).status

    def runners(self) -> list[LocalRunner]:
        return [
            LocalRunner(runner_id, runner.spec.instance_id, runner.status, runner.status_since)
            for runner_id, runner in self._runners.items()
        ]

    def subscribe_status(self) -> MemoryObjectReceiveStream[tuple[RunnerId, RunnerStatus]]:
        """Every status change of every runner from now on, in order. Close the stream to unsubscribe."""
        send, receive = anyio.create_memory_object_stream[tuple[RunnerId, RunnerStatus]](math.inf)
        self._status_subscribers.append(send)
        return receive

    def subscribe_chunks(self) -> MemoryObjectReceiveStream[TaskChunk]:
        """Chunks of tasks not submitted to this supervisor (to forward to the node holding the request)."""
        send, receive = anyio.create_memory_object_stream[TaskChunk](math.inf)
        self._chunk_subscribers.append(send)
        return receive

    async def shutdown(self, runner_id: RunnerId, reason: str = "shutdown requested") -> RunnerStatus:
        """Ask the runner (and so its group) to stop; returns its final status. A runner that does not
        exit within the shutting-down deadline is killed and ends Failed with that reason; one still
        starting is killed at once and ends Shutdown (see the module doc)."""
        runner = self._get(runner_id)
        if not runner.exited.is_set():
            if not runner.stop_requested:
                runner.stop_requested = True
                starting = is_starting(runner.status)
                self._set_status(runner_id, runner, RunnerShuttingDown())
                if starting:
                    runner.stopped_while_starting = True
                    kill(runner.process)
                else:
                    try:
                        runner.conn.send(StopRunner(reason))
                    except OSError:
                        kill(runner.process)  # its end is gone: it is exiting, or must
            await runner.exited.wait()
        return runner.status

    async def fail(self, runner_id: RunnerId, reason: str) -> RunnerStatus:
        """Kill the runner's process now; it ends Failed(reason). Returns its final status."""
        runner = self._get(runner_id)
        if not runner.exited.is_set():
            runner.kill_reason = runner.kill_reason or reason
            kill(runner.process)
            await runner.exited.wait()
        return runner.status

    def forget(self, runner_id: RunnerId) -> None:
        runner = self._get(runner_id)
        if not runner.exited.is_set():
            raise SupervisorError(f"runner {runner_id} is still running; shut it down first")
        del self._runners[runner_id]

    # --- tasks ---------------------------------------------------------------------------------------

    def submit(self, runner_id: RunnerId, task: SubmitTask) -> TaskStream:
        """Hand a task to rank 0 of an instance; its chunks come back on the returned stream."""
        runner = self._get(runner_id)
        if runner.spec.rank != 0:
            raise SupervisorError(f"runner {runner_id} is rank {runner.spec.rank}: tasks go to rank 0")
        if not is_serving(runner.status):
            raise SupervisorError(f"runner {runner_id} is not serving (it is {_stage(runner.status)})")
        if task.task_id in self._tasks:
            raise SupervisorError(f"task {task.task_id} is already in flight")
        send, receive = anyio.create_memory_object_stream[TaskChunk](math.inf)
        self._tasks[task.task_id] = _Task(runner_id, runner.spec.instance_id, send)
        try:
            runner.conn.send(task)
        except OSError:
            # The runner is dying; its exit fails the task (it is registered) as soon as EOF is read.
            kill(runner.process)
        return TaskStream(task.task_id, receive)

    def cancel(self, task_id: TaskId) -> bool:
        """Ask the runner to abort a task; its stream ends with finish_reason "abort". False if unknown."""
        task = self._tasks.get(task_id)
        if task is None:
            return False
        runner = self._runners.get(task.runner_id)
        if runner is None or runner.exited.is_set():
            return False
        try:
            runner.conn.send(CancelTask(task_id))
        except OSError:
            kill(runner.process)
        return True

    # --- internals -----------------------------------------------------------------------------------

    def _get(self, runner_id: RunnerId) -> _Runner:
        runner = self._runners.get(runner_id)
        if runner is None:
            raise SupervisorError(f"no runner {runner_id} on this node")
        return runner

    async def _read(self, runner_id: RunnerId, runner: _Runner) -> None:
        try:
            await self._receive_until_eof(runner_id, runner)
        finally:
            with anyio.CancelScope(shield=True):
                returncode = await reap(runner.process, EXIT_GRACE_S)
                self._on_exit(runner_id, runner, returncode)

    async def _receive_until_eof(self, runner_id: RunnerId, runner: _Runner) -> None:
        while True:
            await anyio.wait_readable(runner.conn.fileno())
            while runner.conn.poll():
                try:
                    message = runner.conn.recv()
                except (EOFError, OSError):
                    return  # the process closed its end: it is exiting
                if isinstance(message, StatusReport):
                    self._on_report(runner_id, runner, message.status)
                elif isinstance(message, ChunkBatch):
                    self._route(runner.spec, message.chunks)

    def _on_report(self, runner_id: RunnerId, runner: _Runner, status: RunnerStatus) -> None:
        # After a stop request, only the stop's own progress counts (not e.g. a late Ready).
        if runner.stop_requested and not isinstance(
            status, RunnerShuttingDown | RunnerShutdown | RunnerFailed
        ):
            return
        self._set_status(runner_id, runner, status)

    def _on_exit(self, runner_id: RunnerId, runner: _Runner, returncode: int) -> None:
        if runner.kill_reason is not None:
            final: RunnerStatus = RunnerFailed(reason=runner.kill_reason[:MAX_REASON])
        elif isinstance(runner.status, RunnerShutdown | RunnerFailed):
            final = runner.status
        elif runner.stop_requested and (returncode == 0 or runner.stopped_while_starting):
            final = RunnerShutdown()
        else:
            reason = f"runner process {describe_exit(returncode)} while {_stage(runner.status)}"
            final = RunnerFailed(reason=reason)
        self._set_status(runner_id, runner, final)
        runner.conn.close()
        runner.exited.set()
        runner.changed.set()  # wakes the deadline watch, which then ends
        why = final.reason if isinstance(final, RunnerFailed) else "shut down"
        self._fail_instance_tasks(runner.spec.instance_id, f"runner {runner_id} {why}")

    def _fail_instance_tasks(self, instance_id: InstanceId, message: str) -> None:
        for task_id, task in list(self._tasks.items()):
            if task.instance_id == instance_id:
                self._deliver(task_id, task, TaskChunk(task_id, error=message))
        for task_id, relayed_instance in list(self._relayed.items()):
            if relayed_instance == instance_id:
                del self._relayed[task_id]
                self._broadcast(self._chunk_subscribers, TaskChunk(task_id, error=message))

    def _route(self, spec: RunnerSpec, chunks: tuple[TaskChunk, ...]) -> None:
        instance_id = spec.instance_id
        for chunk in chunks:
            task = self._tasks.get(chunk.task_id)
            if not spec.is_sampling_rank and chunk.error is None:
                # Rank 0's end marker: it ends the task's stream here unless the sampling rank runs here
                # too (then its own last chunk, with the content, does).
                if task is not None and not self._samples_here(instance_id, spec.world_size):
                    self._deliver(chunk.task_id, task, chunk)
                continue
            if task is not None:
                self._deliver(chunk.task_id, task, chunk)
                continue
            if chunk.is_last:
                self._relayed.pop(chunk.task_id, None)
            else:
                self._relayed[chunk.task_id] = instance_id
            self._broadcast(self._chunk_subscribers, chunk)

    def _samples_here(self, instance_id: InstanceId, world_size: int) -> bool:
        return any(
            r.spec.instance_id == instance_id and r.spec.is_sampling_rank and r.spec.world_size == world_size
            for r in self._runners.values()
        )

    def _deliver(self, task_id: TaskId, task: _Task, chunk: TaskChunk) -> None:
        # A consumer that stopped listening misses the chunk; the task's bookkeeping still ends below.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            task.send.send_nowait(chunk)
        if chunk.is_last:
            task.send.close()
            del self._tasks[task_id]

    def _set_status(self, runner_id: RunnerId, runner: _Runner, status: RunnerStatus) -> None:
        if status == runner.status:
            return
        if status.kind != runner.status.kind:
            runner.status_since = time.monotonic()
        runner.status = status
        changed, runner.changed = runner.changed, anyio.Event()
        changed.set()
        self._publish_status(runner_id, status)

    def _publish_status(self, runner_id: RunnerId, status: RunnerStatus) -> None:
        self._broadcast(self._status_subscribers, (runner_id, status))

    @staticmethod
    def _broadcast(subscribers: list[MemoryObjectSendStream[_T]], item: _T) -> None:
        for send in list(subscribers):
            try:
                send.send_nowait(item)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                subscribers.remove(send)

    async def _enforce_deadlines(self, runner_id: RunnerId, runner: _Runner) -> None:
        deadlines = self.config.deadlines
        while not runner.exited.is_set():
            changed = runner.changed
            stage = deadlines.for_status(runner.status)
            if stage is None:
                await changed.wait()
                continue
            name, limit = stage
            with anyio.move_on_after(runner.status_since + limit - time.monotonic()):
                await changed.wait()
            if changed.is_set() or runner.exited.is_set():
                continue
            detail = ""
            if isinstance(runner.status, RunnerLoading):
                detail = f" ({runner.status.layers_done} of {runner.status.layers_total} layers loaded)"
            await self.fail(runner_id, f"{name} did not finish within its deadline of {limit:g} s{detail}")


def _stage(status: RunnerStatus) -> str:
    return status.kind.removeprefix("runner_").replace("_", " ")

"""The worker role: runs this node's shards of the cluster's instances as runner subprocesses.

Inputs: the replicated State (instances and runner statuses), StartGeneration / CancelGeneration frames
(for instances with a shard here), and the runners' own reports through the RunnerSupervisor.
Outputs: ReportRunnerStatus commands to the master; GenerationChunks frames straight to the node that
holds each request.

The loop carries out `shoal.worker.plan` one action at a time: spawn a runner for a shard assigned here,
report a status the cluster has not recorded, shut down the runners of a deleted instance (or whose
sibling failed), fail a runner that overran its stage's deadline. Ready and Running are reported as one
coarse "Ready" so the log does not grow with every request; the API node counts its own tasks.

Chunks: tasks reach rank 0's runner; the sampling rank's node (rank 0's too, unless a pipeline samples on
its last stage elsewhere) sends the content to the task's origin. Errors (a bad prompt, a runner that
died) go to the origin from whichever node sees them first; the origin keeps the first last chunk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from shoal.engine.sampling import SamplingParams
from shoal.master.placement import reachable_host
from shoal.master.shard_memory import stage_kv_bytes
from shoal.runner.messages import SubmitTask, TaskChunk, TaskPrompt
from shoal.runner.spec import RunnerSpec
from shoal.types import Command, CommandAccepted, CommandRejected, NodeId, State, WireMessage
from shoal.types.generation import (
    CancelGeneration,
    ChatMessage,
    ErrorKind,
    GenerationChunk,
    GenerationChunks,
    StartGeneration,
)
from shoal.types.instance_ids import RunnerId, TaskId
from shoal.types.instance_messages import ReportRunnerStatus
from shoal.types.instances import Instance, ShardAssignment
from shoal.types.runners import RunnerReady, RunnerRunning, RunnerShuttingDown, RunnerStatus, is_terminal
from shoal.worker.plan import (
    DEFAULT_DEADLINES,
    Action,
    FailRunner,
    ForgetRunner,
    LocalRunner,
    ReportStatus,
    ShutdownRunner,
    SpawnRunner,
    StageDeadlines,
    WorkerView,
    plan,
)
from shoal.worker.supervisor import RunnerSupervisor, SupervisorConfig, SupervisorError, TaskStream

log = logging.getLogger("shoal.worker")

# Chunks of a task whose StartGeneration has not reached this (sampling) node yet wait this long.
UNROUTED_CHUNK_TTL_S = 30.0
REPLICA_CATCH_UP_S = 1.0
MAX_ROUTES = 100_000
MAX_ERROR_CHARS = 4096
KV_BLOCK_TOKENS: int = RunnerSpec.model_fields["block_size"].default


@dataclass(frozen=True)
class WorkerSettings:
    data_dir: Path
    runner_threads: int | None = None
    compile_decode: bool = True
    deadlines: StageDeadlines = DEFAULT_DEADLINES
    runner_env: Mapping[str, str] = field(default_factory=dict)
    tick_s: float = 0.05


CommandReply = CommandAccepted | CommandRejected


class Worker:
    def __init__(
        self,
        node_id: NodeId,
        settings: WorkerSettings,
        state: Callable[[], State],
        submit: Callable[[Command], Awaitable[CommandReply | None]],
        send: Callable[[NodeId, WireMessage], Awaitable[None]],
    ) -> None:
        self.node_id = node_id
        self._settings = settings
        self._state = state
        self._submit = submit
        self._send = send
        self._supervisor: RunnerSupervisor | None = None
        self._task_group: TaskGroup | None = None
        self._stopping: set[RunnerId] = set()
        self._routes: dict[TaskId, NodeId] = {}
        self._unrouted: dict[TaskId, tuple[float, list[TaskChunk]]] = {}
        self.num_tasks_started = 0
        self.num_tasks_cancelled = 0

    def diagnostics(self) -> dict[str, object]:
        """This node's runners as it sees them (finer than the cluster's coarse record) and task counts."""
        supervisor = self._supervisor
        runners = (
            {r.runner_id: r.status.model_dump(mode="json") for r in supervisor.runners()}
            if supervisor
            else {}
        )
        return {
            "runners": runners,
            "tasks_started": self.num_tasks_started,
            "tasks_cancelled": self.num_tasks_cancelled,
        }

    async def run(self) -> None:
        # Compiled decode kernels are cached under the node's data dir, so a restart compiles nothing new.
        env = {"TORCHINDUCTOR_CACHE_DIR": str(self._settings.data_dir / "compile-cache")}
        config = SupervisorConfig(
            deadlines=self._settings.deadlines, runner_env={**env, **self._settings.runner_env}
        )
        async with RunnerSupervisor(config) as supervisor, anyio.create_task_group() as tg:
            self._supervisor, self._task_group = supervisor, tg
            try:
                tg.start_soon(self._relay, supervisor.subscribe_chunks())
                await self._plan_loop(supervisor)
            finally:
                tg.cancel_scope.cancel()
                self._supervisor = self._task_group = None

    # --- the plan ------------------------------------------------------------------------------------

    async def _plan_loop(self, supervisor: RunnerSupervisor) -> None:
        while True:
            state = self._state()
            action = plan(
                WorkerView(state.instances, state.runners),
                self.node_id,
                self._local_runners(supervisor),
                time.monotonic(),
                self._settings.deadlines,
            )
            if action is None:
                await anyio.sleep(self._settings.tick_s)
                continue
            try:
                await self._carry_out(supervisor, action, state)
            except Exception:
                # Top of the loop: one failed action must not stop the worker; plan retries it.
                log.exception("worker action %s failed", type(action).__name__)
                await anyio.sleep(self._settings.tick_s)

    def _local_runners(self, supervisor: RunnerSupervisor) -> list[LocalRunner]:
        runners = []
        for runner in supervisor.runners():
            status: RunnerStatus = runner.status
            if isinstance(status, RunnerRunning):
                status = RunnerReady()  # coarse: the cluster does not follow every request
            elif runner.runner_id in self._stopping and not is_terminal(status):
                status = RunnerShuttingDown()  # its shutdown is under way in the task group
            runners.append(LocalRunner(runner.runner_id, runner.instance_id, status, runner.status_since))
        return runners

    async def _carry_out(self, supervisor: RunnerSupervisor, action: Action, state: State) -> None:
        if isinstance(action, SpawnRunner):
            spec = RunnerSpec.for_shard(
                action.instance,
                action.shard,
                action.instance.card.source,
                tokenizer_cache_dir=str(self._settings.data_dir / "tokenizers"),
                num_threads=self._settings.runner_threads,
                compile_decode=self._settings.compile_decode,
                max_model_len=_max_model_len(action.instance, action.shard),
            )
            log.info("starting runner %s (rank %d of %d)", spec.runner_id, spec.rank, spec.world_size)
            await supervisor.spawn(spec, env=self._group_env(state, action.instance.rendezvous.host))
        elif isinstance(action, ReportStatus):
            reply = await self._submit(
                ReportRunnerStatus(
                    runner_id=action.runner_id,
                    instance_id=action.instance_id,
                    node_id=self.node_id,
                    status=action.status,
                )
            )
            if isinstance(reply, CommandAccepted):
                await self._wait_for_index(reply.last_index)
            else:  # rejected (the instance is gone) or no master: plan again after a pause
                await anyio.sleep(self._settings.tick_s)
        elif isinstance(action, ShutdownRunner):
            log.info("stopping runner %s: %s", action.runner_id, action.reason)
            self._stopping.add(action.runner_id)
            assert self._task_group is not None
            self._task_group.start_soon(self._shutdown, supervisor, action.runner_id, action.reason)
        elif isinstance(action, FailRunner):
            log.warning("failing runner %s: %s", action.runner_id, action.reason)
            await supervisor.fail(action.runner_id, action.reason)
        elif isinstance(action, ForgetRunner):
            if not supervisor.has_exited(action.runner_id):
                # It reported its end but its process is still exiting (the supervisor reaps it shortly).
                await anyio.sleep(self._settings.tick_s)
                return
            supervisor.forget(action.runner_id)
            self._stopping.discard(action.runner_id)

    async def _shutdown(self, supervisor: RunnerSupervisor, runner_id: RunnerId, reason: str) -> None:
        with contextlib.suppress(SupervisorError):
            await supervisor.shutdown(runner_id, reason)

    async def _wait_for_index(self, index: int) -> None:
        """Until this node's replica holds the master's answer, so the next plan sees it."""
        with anyio.move_on_after(REPLICA_CATCH_UP_S):
            while self._state().last_index < index:
                await anyio.sleep(0.01)

    def _group_env(self, state: State, rendezvous_host: str) -> dict[str, str]:
        """GLOO_SOCKET_IFNAME: the interface that holds the address this node is reached at (loopback
        for a loopback cluster), so gloo does not pick an interface its peers cannot reach."""
        record = state.nodes.get(self.node_id)
        host = reachable_host(record.profile) if record is not None else rendezvous_host
        if host.startswith("127.") or host == "::1":
            return {"GLOO_SOCKET_IFNAME": "lo"}
        if record is not None:
            for interface in record.profile.network_interfaces:
                if host in interface.addresses:
                    return {"GLOO_SOCKET_IFNAME": interface.name}
        return {}

    # --- tasks ---------------------------------------------------------------------------------------

    async def on_start(self, start: StartGeneration) -> None:
        """A task for an instance with a shard here: submit it (rank 0), and/or note its route (sampler)."""
        supervisor = self._supervisor
        instance = self._state().instances.get(start.instance_id)
        shard = instance.shard_on(self.node_id) if instance is not None else None
        if supervisor is None or instance is None or shard is None:
            await self._send_chunks(
                start.origin,
                start.task_id,
                [
                    GenerationChunk(
                        error=f"no shard of instance {start.instance_id} on node {self.node_id}",
                        error_kind="unavailable",
                    )
                ],
            )
            return
        sampling_rank = instance.shards[-1].rank if instance.sharding == "pipeline" else 0
        if shard.rank == sampling_rank and shard.rank != 0:
            self._routes[start.task_id] = start.origin
            while len(self._routes) > MAX_ROUTES:  # tasks whose end never came here (rank 0 refused them)
                del self._routes[next(iter(self._routes))]
            waiting = self._unrouted.pop(start.task_id, None)
            if waiting is not None:
                for chunk in waiting[1]:
                    await self._forward(start.origin, chunk)
            return
        if shard.rank != 0:
            return
        try:
            stream = supervisor.submit(
                shard.runner_id,
                SubmitTask(start.task_id, _task_prompt(start), _sampling(start), _tools(start)),
            )
        except (SupervisorError, ValueError) as error:
            await self._send_chunks(
                start.origin,
                start.task_id,
                [GenerationChunk(error=str(error)[:MAX_ERROR_CHARS], error_kind="unavailable")],
            )
            return
        self.num_tasks_started += 1
        assert self._task_group is not None
        self._task_group.start_soon(self._stream, stream, start.origin, shard.rank == sampling_rank)

    def on_cancel(self, cancel: CancelGeneration) -> None:
        if self._supervisor is not None and self._supervisor.cancel(cancel.task_id):
            self.num_tasks_cancelled += 1

    async def _stream(self, stream: TaskStream, origin: NodeId, samples_here: bool) -> None:
        async for chunk in stream:
            # Without the sampling rank here, only errors are ours to send (the rest is an end marker).
            if samples_here or chunk.error is not None:
                await self._forward(origin, chunk)

    async def _relay(self, chunks: MemoryObjectReceiveStream[TaskChunk]) -> None:
        """Chunks of tasks submitted on another node (this node samples for them)."""
        async for chunk in chunks:
            origin = self._routes.get(chunk.task_id)
            if origin is None:
                self._hold(chunk)
                continue
            if chunk.is_last:
                del self._routes[chunk.task_id]
            await self._forward(origin, chunk)

    def _hold(self, chunk: TaskChunk) -> None:
        now = time.monotonic()
        for task_id, (since, _) in list(self._unrouted.items()):
            if now - since > UNROUTED_CHUNK_TTL_S:
                del self._unrouted[task_id]
        self._unrouted.setdefault(chunk.task_id, (now, []))[1].append(chunk)

    async def _forward(self, origin: NodeId, chunk: TaskChunk) -> None:
        await self._send_chunks(origin, chunk.task_id, [_wire_chunk(chunk)])

    async def _send_chunks(self, origin: NodeId, task_id: TaskId, chunks: Sequence[GenerationChunk]) -> None:
        try:
            await self._send(origin, GenerationChunks(task_id=task_id, chunks=tuple(chunks)))
        except Exception:
            # Top of a task's delivery: the origin's own deadline ends its request if this never arrives.
            log.exception("could not send chunks of task %s to %s", task_id, origin)


def _max_model_len(instance: Instance, shard: ShardAssignment) -> int:
    """The longest sequence the shard's KV budget holds (placement sized it for the headroom tokens),
    capped at the model's context; the runner refuses a budget that cannot hold one such sequence."""
    per_token = stage_kv_bytes(instance.card, shard.num_layers, 1, shard.tp_size)
    tokens = shard.kv_cache_bytes // per_token if per_token else instance.card.context_length
    return max(1, min(instance.card.context_length, tokens - tokens % KV_BLOCK_TOKENS))


def _task_prompt(start: StartGeneration) -> TaskPrompt:
    prompt = start.prompt
    if isinstance(prompt, str):
        return prompt
    messages = [_template_message(item) for item in prompt if isinstance(item, ChatMessage)]
    return messages if messages else [item for item in prompt if isinstance(item, int)]


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A chat message as Hugging Face chat templates read it (tool call arguments as objects)."""
    rendered: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name is not None:
        rendered["name"] = message.name
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        rendered["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _json_or_text(call.arguments)},
            }
            for call in message.tool_calls
        ]
    return rendered


def _tools(start: StartGeneration) -> tuple[dict[str, Any], ...]:
    return tuple(
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": _json_or_text(tool.parameters),
            },
        }
        for tool in start.tools
    )


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _sampling(start: StartGeneration) -> SamplingParams:
    return SamplingParams(**start.params.model_dump())


def _wire_chunk(chunk: TaskChunk) -> GenerationChunk:
    stats = chunk.stats
    last = chunk.is_last and chunk.error is None
    return GenerationChunk(
        text=chunk.text,
        token_ids=tuple(chunk.token_ids),
        finish_reason=chunk.finish_reason,
        error=chunk.error[:MAX_ERROR_CHARS] if chunk.error is not None else None,
        error_kind=_error_kind(chunk),
        prompt_tokens=stats.prompt_tokens if last and stats is not None else None,
        completion_tokens=stats.completion_tokens if last and stats is not None else None,
        cached_tokens=stats.cached_tokens if last and stats is not None else None,
        logprobs=chunk.logprobs or (),
    )


def _error_kind(chunk: TaskChunk) -> ErrorKind | None:
    if chunk.error is None:
        return None
    return "invalid_request" if chunk.error_kind == "invalid_request" else "server_error"

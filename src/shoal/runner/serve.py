"""The runner process's life: `serve(spec, conn, faults) -> exit code`.

Inputs: a RunnerSpec, the duplex connection to the supervisor (tasks and cancels arrive at rank 0; a stop
request may arrive at any rank), and test-only faults. Outputs on the connection: a status report at
every stage (Connecting, Connected, Loading, Loaded, WarmingUp, Ready/Running, ShuttingDown, Shutdown, or
Failed with the reason) and, once per step, the sampling rank's chunks keyed by task id (plus, from a rank 0
that does not sample, an empty end marker when a task finishes).

Each step, on every rank: rank 0's delta since the last step (admissions and cancellations, in arrival
order) reaches all ranks together with any rank's wish to stop (group.py: agreed before the step for
tensor parallel, at its end for a pipeline); every rank applies it in the same order and runs the same
engine step (see stage.py). In a pipeline, rank 0 sends the next step's delta as soon as it has handed
its hidden states to rank 1, while it waits for the tokens anyway: the delta then travels off the
critical path, and rank 0 starts computing as soon as the tokens arrive. Idle, rank 0 still exchanges
an empty delta every `heartbeat_s`, so an idle group never hits its collective timeout and a stop is
seen promptly.
A request that fails alone (bad prompt, too long) is a chunk error; anything else ends the runner.
"""

from __future__ import annotations

import json
import os
import queue
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

import torch

from shoal.engine.errors import InvalidRequestError, ShoalError
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.output_processor import RequestOutput
from shoal.engine.sampling import SampleResult, SamplingParams
from shoal.engine.tokenizer import Tokenizer
from shoal.runner.group import StepChannel, open_channel, start_group, stop_group
from shoal.runner.link import SupervisorLink
from shoal.runner.messages import CancelTask, SubmitTask, TaskChunk, TaskPrompt
from shoal.runner.spec import RunnerFaults, RunnerSpec, StallStage
from shoal.runner.stage import DistributedStage, build_engine, lockstep_params, warm_up
from shoal.types.generation import TokenLogprobs, TopLogprob
from shoal.types.instance_ids import TaskId
from shoal.types.runners import (
    RunnerConnected,
    RunnerConnecting,
    RunnerFailed,
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerShutdown,
    RunnerShuttingDown,
    RunnerWarmingUp,
)

MAX_REASON = 2000
# One op of a step's delta: ["add", task_id, prompt token ids, sampling params] or ["abort", task_id].
Op = list[Any]


class _StopBeforeServing(Exception):
    """A stop request that arrived while the runner was still starting."""


def serve(spec: RunnerSpec, conn: Connection, faults: RunnerFaults) -> int:
    link = SupervisorLink(conn)
    link.start()

    def enter(stage: StallStage | None) -> None:
        if link.stop_requested.is_set():
            raise _StopBeforeServing
        if stage is not None:
            _maybe_stall(faults, stage)

    try:
        if spec.num_threads is not None:
            torch.set_num_threads(spec.num_threads)
        link.report(RunnerConnecting())
        enter("connecting")
        store = start_group(spec)
        if spec.cpu_affinity is not None:
            _pin(spec.cpu_affinity)
        link.report(RunnerConnected())
        link.report(RunnerLoading(layers_done=0, layers_total=spec.layer_end - spec.layer_start))
        enter("loading")
        channel = open_channel(spec, store)
        engine = build_engine(spec, channel)
        link.report(RunnerLoaded())
        link.report(RunnerWarmingUp())
        enter("warming_up")
        warm_up(engine)
        link.report(RunnerReady())
        # From here on a stop is agreed by the whole group, in the step loop's exchange.
        StepLoop(spec, engine, channel, link).run()
    except _StopBeforeServing:
        # Leaving before serving: the peers fail their next collective, as the instance is going anyway.
        link.report(RunnerShuttingDown())
    except Exception as exc:  # the top of the process: every failure becomes the Failed reason
        reason = f"rank {spec.rank}: {type(exc).__name__}: {exc}"
        link.report(RunnerFailed(reason=reason[:MAX_REASON]))
        return 1
    link.report(RunnerShuttingDown())
    stop_group()
    link.report(RunnerShutdown())
    return 0


def _pin(cpus: tuple[int, ...]) -> None:
    """Threads started from here on (torch's pool, gloo's) inherit the main thread's affinity."""
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        raise ValueError(f"cannot pin the runner to CPUs {list(cpus)}: {exc}") from exc


def _maybe_stall(faults: RunnerFaults, stage: StallStage) -> None:
    if faults.stall_stage == stage:
        while True:  # hang like a stuck load would; only the supervisor's deadline ends this process
            time.sleep(3600)


class StepLoop:
    def __init__(
        self, spec: RunnerSpec, engine: LLMEngine, channel: StepChannel, link: SupervisorLink
    ) -> None:
        self.spec = spec
        self.engine = engine
        self.channel = channel
        self.link = link
        self.active: set[str] = set()
        # Chunks only this rank can send this step (rank 0's per-request errors).
        self.errors: list[TaskChunk] = []
        # A pipeline's rank 0 begins the next step as soon as it has handed this step's hidden states on,
        # while it waits for the tokens anyway; the next iteration then starts computing at once.
        self._begun: tuple[bytes, bool] | None = None
        if channel.chained and spec.rank == 0:
            stage = engine.runner
            assert isinstance(stage, DistributedStage)
            stage.on_handoff = self._begin_next

    def run(self) -> None:
        while True:
            payload, stop = self._begun or self._begin()
            self._begun = None
            if stop:
                return
            self._apply(json.loads(payload) if payload else [])
            outputs = self.engine.step() if self.engine.has_unfinished() else []
            self._publish(outputs)
            if self.channel.end_step():
                return

    def _begin(self) -> tuple[bytes, bool]:
        """The next step's delta, from rank 0 to every rank (see StepChannel.begin_step)."""
        ops = self._collect()
        payload = json.dumps(ops).encode() if ops else b""
        return self.channel.begin_step(payload, self.link.stop_requested.is_set())

    def _begin_next(self) -> None:
        """Mid-step (rank 0 of a pipeline): the ops that arrived so far go to the next step. The group
        agrees on a stop at this step's end, so a next step begun here is never run after a stop."""
        self._begun = self._begin()

    def _collect(self) -> list[Op]:
        """Drain the inbox; rank 0 turns tasks into ops. Idle, wait up to one heartbeat for the first."""
        ops: list[Op] = []
        wait = self.spec.rank == 0 and not self.engine.has_unfinished()
        while True:
            try:
                message = (
                    self.link.inbox.get(timeout=self.spec.heartbeat_s)
                    if wait
                    else self.link.inbox.get_nowait()
                )
            except queue.Empty:
                return ops
            wait = False
            if isinstance(message, SubmitTask | CancelTask) and self.spec.rank != 0:
                self.errors.append(
                    TaskChunk(message.task_id, error=f"rank {self.spec.rank} takes no tasks: send to rank 0")
                )
            elif isinstance(message, SubmitTask):
                op = self._admission(message)
                if op is not None:
                    ops.append(op)
            elif isinstance(message, CancelTask):
                ops.append(["abort", message.task_id])

    def _admission(self, task: SubmitTask) -> Op | None:
        try:
            token_ids = prompt_token_ids(self.engine.tokenizer, task.prompt, task.tools)
            params = lockstep_params(self.spec, task.params)
        except (ShoalError, TypeError, ValueError) as exc:
            self.errors.append(TaskChunk(task.task_id, error=str(exc), error_kind="invalid_request"))
            return None
        return ["add", task.task_id, token_ids, params]

    def _apply(self, ops: list[Op]) -> None:
        for op in ops:
            if op[0] == "add":
                _, task_id, token_ids, params = op
                try:
                    self.engine.add_request(task_id, token_ids, SamplingParams(**params))
                except InvalidRequestError as exc:  # the same on every rank, so every rank skips it
                    if self.spec.rank == 0:
                        self.errors.append(TaskChunk(task_id, error=str(exc), error_kind="invalid_request"))
                    continue
                self.active.add(task_id)
            else:
                self.engine.abort(op[1])

    def _publish(self, outputs: list[RequestOutput]) -> None:
        chunks, self.errors = self.errors, []
        for output in outputs:
            if output.request_id not in self.active:
                continue  # the warm-up's own request
            if output.finished:
                self.active.discard(output.request_id)
            if self.spec.is_sampling_rank:
                chunks.append(_chunk(output, self.engine.tokenizer))
            elif output.finished and self.spec.rank == 0:
                # An end marker with no content: rank 0's node holds the task's bookkeeping and must learn
                # that it ended, even though the chunks themselves come from the sampling rank.
                chunks.append(TaskChunk(TaskId(output.request_id), finish_reason=output.finish_reason))
        num_tasks = len(self.active)
        # Status first: a task's first chunk never arrives before the Running that counts it.
        self.link.report(RunnerRunning(num_tasks=num_tasks) if num_tasks else RunnerReady())
        self.link.send_chunks(chunks)


def prompt_token_ids(
    tokenizer: Tokenizer, prompt: TaskPrompt, tools: Sequence[Mapping[str, Any]] = ()
) -> list[int]:
    """Text is encoded, chat messages rendered with the model's template (offering `tools`); token ids
    pass through to the engine, which checks them against the vocabulary."""
    if tools and (isinstance(prompt, str) or not all(isinstance(m, Mapping) for m in prompt)):
        raise InvalidRequestError("tools need a chat prompt (messages)", field="tools")
    if isinstance(prompt, str):
        return tokenizer.encode(prompt) if prompt else []
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
        return tokenizer.apply_chat_template([m for m in prompt if isinstance(m, Mapping)], tools or None)
    if isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt if isinstance(t, int)]
    raise InvalidRequestError("prompt must be text, token ids or chat messages", field="prompt")


def _chunk(output: RequestOutput, tokenizer: Tokenizer) -> TaskChunk:
    logprobs = None
    if output.logprobs is not None:
        logprobs = tuple(token_logprobs(result, tokenizer) for result in output.logprobs)
    return TaskChunk(
        task_id=TaskId(output.request_id),
        text=output.text,
        token_ids=output.token_ids,
        logprobs=logprobs,
        finish_reason=output.finish_reason,
        stats=output.stats,
    )


def token_logprobs(result: SampleResult, tokenizer: Tokenizer) -> TokenLogprobs:
    """A sampled token's logprob with token texts, as the APIs show them."""

    def text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    top = tuple(
        TopLogprob(token_id=t.token_id, token=text(t.token_id), logprob=t.logprob)
        for t in result.top_logprobs
    )
    logprob = result.logprob if result.logprob is not None else float("nan")
    return TokenLogprobs(token_id=result.token_id, token=text(result.token_id), logprob=logprob, top=top)

"""Runner statuses: the lifecycle of one runner subprocess (one shard of one instance).

    Idle -> Connecting -> Connected -> Loading(done/total) -> Loaded -> WarmingUp -> Ready <-> Running
    any -> ShuttingDown -> Shutdown;  any -> Failed(reason)

`RunnerStatus` is the one union of this family; every `kind` is prefixed `runner_` so it never collides
with a command's or event's kind.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, StringConstraints, TypeAdapter, model_validator

from shoal.types._base import FrozenModel

Reason = Annotated[str, StringConstraints(min_length=1, max_length=2000)]


class RunnerIdle(FrozenModel):
    """Spawned; has not started to join its instance's group yet."""

    kind: Literal["runner_idle"] = "runner_idle"


class RunnerConnecting(FrozenModel):
    """Joining the instance's `torch.distributed` group (waits for every rank)."""

    kind: Literal["runner_connecting"] = "runner_connecting"


class RunnerConnected(FrozenModel):
    kind: Literal["runner_connected"] = "runner_connected"


class RunnerLoading(FrozenModel):
    kind: Literal["runner_loading"] = "runner_loading"
    layers_done: Annotated[int, Field(ge=0)]
    layers_total: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _check_progress(self) -> Self:
        if self.layers_done > self.layers_total:
            raise ValueError(f"layers_done {self.layers_done} exceeds layers_total {self.layers_total}")
        return self


class RunnerLoaded(FrozenModel):
    kind: Literal["runner_loaded"] = "runner_loaded"


class RunnerWarmingUp(FrozenModel):
    kind: Literal["runner_warming_up"] = "runner_warming_up"


class RunnerReady(FrozenModel):
    """Serving, with no task in flight."""

    kind: Literal["runner_ready"] = "runner_ready"


class RunnerRunning(FrozenModel):
    """Serving, with `num_tasks` tasks in flight."""

    kind: Literal["runner_running"] = "runner_running"
    num_tasks: Annotated[int, Field(ge=1)] = 1


class RunnerShuttingDown(FrozenModel):
    kind: Literal["runner_shutting_down"] = "runner_shutting_down"


class RunnerShutdown(FrozenModel):
    kind: Literal["runner_shutdown"] = "runner_shutdown"


class RunnerFailed(FrozenModel):
    kind: Literal["runner_failed"] = "runner_failed"
    reason: Reason


RunnerStatus = Annotated[
    RunnerIdle
    | RunnerConnecting
    | RunnerConnected
    | RunnerLoading
    | RunnerLoaded
    | RunnerWarmingUp
    | RunnerReady
    | RunnerRunning
    | RunnerShuttingDown
    | RunnerShutdown
    | RunnerFailed,
    Field(discriminator="kind"),
]
RUNNER_STATUS_ADAPTER: TypeAdapter[RunnerStatus] = TypeAdapter(RunnerStatus)


def is_terminal(status: RunnerStatus) -> bool:
    """The process is gone (or must be treated as gone): nothing will change its status again."""
    return isinstance(status, RunnerShutdown | RunnerFailed)


def is_serving(status: RunnerStatus) -> bool:
    """The runner can take tasks: routing picks instances whose runners all are."""
    return isinstance(status, RunnerReady | RunnerRunning)


def is_starting(status: RunnerStatus) -> bool:
    """The runner has not served yet (Idle through WarmingUp): it holds no task and no state to drain."""
    return isinstance(
        status,
        RunnerIdle | RunnerConnecting | RunnerConnected | RunnerLoading | RunnerLoaded | RunnerWarmingUp,
    )

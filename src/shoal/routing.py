"""Which instance serves a generation request: `pick_instance(state, model, in_flight)`. Pure.

Only instances of that model whose runners are all Ready/Running can take it; among them the one with the
fewest tasks this node has in flight on it (then the smallest id, so the choice is deterministic). When none
can serve, the answer says whether one is on its way (some instance of the model is still starting: the
API answers 503 with Retry-After) or there is none at all (404).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shoal.models import matches
from shoal.types import State
from shoal.types.instance_ids import InstanceId
from shoal.types.instances import Instance
from shoal.types.runners import is_serving, is_terminal


@dataclass(frozen=True, slots=True)
class NoInstance:
    reason: str
    loading: bool


def pick_instance(
    state: State, model: str, in_flight: Mapping[InstanceId, int], instance_id: InstanceId | None = None
) -> Instance | NoInstance:
    """`instance_id` pins the request to that instance (it must be of `model`)."""
    candidates = [
        instance
        for instance in state.instances.values()
        if matches(model, instance.card) and instance_id in (None, instance.instance_id)
    ]
    serving = [instance for instance in candidates if _all_serving(state, instance)]
    if serving:
        return min(
            serving, key=lambda instance: (in_flight.get(instance.instance_id, 0), instance.instance_id)
        )
    starting = [instance for instance in candidates if not _any_runner_ended(state, instance)]
    if starting:
        return NoInstance(f"model {model!r} is loading ({len(starting)} instance(s) starting)", loading=True)
    if instance_id is not None:
        return NoInstance(f"no instance {instance_id} of model {model!r}", loading=False)
    return NoInstance(
        f"no instance of model {model!r} is placed; place one with POST /instances", loading=False
    )


def _all_serving(state: State, instance: Instance) -> bool:
    statuses = [state.runners.get(runner_id) for runner_id in instance.runner_ids]
    return all(status is not None and is_serving(status) for status in statuses)


def _any_runner_ended(state: State, instance: Instance) -> bool:
    statuses = [state.runners.get(runner_id) for runner_id in instance.runner_ids]
    return any(status is not None and is_terminal(status) for status in statuses)

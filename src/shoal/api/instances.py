"""Instance and model routes of the node's HTTP API.

POST /instances (place: {model, sharding, min_nodes, backend, node_ids, kv_headroom_tokens, quant}) -> 201
with the instance (`quant`: none | int8 | int4 | auto, default auto as in `shoal generate`), 404 for an unknown model, 409 with the master's placement error (nothing is created), 503 when
no master answered. GET /instances, GET /instances/previews?model=...&quant=..., GET /instances/{id} (with its
runners' statuses), DELETE /instances/{id}. GET /models: the models this node has (the embedded default
and its models directory) and the models placed in the cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from shoal.api.errors import documented, error_response, invalid_response
from shoal.engine.errors import ModelLoadError
from shoal.master.placement import links_from_nodes, previews
from shoal.models import ModelNotFoundError, local_models, resolve_model
from shoal.types import Command, CommandAccepted, CommandRejected, IndexedEvent, State
from shoal.types.instance_ids import InstanceId
from shoal.types.instance_messages import DeleteInstance, InstanceCreated, PlaceInstance
from shoal.types.instances import (
    DEFAULT_WEIGHT_QUANT,
    Instance,
    ModelCard,
    PlacementRequest,
    WeightQuant,
)

REPLICA_WAIT_S = 5.0


class InstanceNode(Protocol):
    @property
    def state(self) -> State: ...

    @property
    def models_dir(self) -> Path: ...

    async def submit(self, command: Command) -> CommandAccepted | CommandRejected | None: ...

    def read_events(self, first: int, last: int) -> Sequence[IndexedEvent]: ...


class PlaceBody(BaseModel):
    model: str = "default"
    sharding: Literal["pipeline", "tensor", "auto"] = "auto"
    min_nodes: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    node_ids: list[str] | None = None
    kv_headroom_tokens: int | None = None
    quant: WeightQuant = DEFAULT_WEIGHT_QUANT


def instance_view(state: State, instance: Instance) -> dict[str, Any]:
    runners = {
        runner_id: state.runners[runner_id].model_dump(mode="json")
        for runner_id in instance.runner_ids
        if runner_id in state.runners
    }
    return {**instance.model_dump(mode="json"), "runners": runners}


def add_instance_routes(app: FastAPI, node: InstanceNode, command_timeout_s: float) -> None:
    async def card_for(model: str) -> ModelCard | JSONResponse:
        try:
            return await anyio.to_thread.run_sync(resolve_model, model, node.models_dir)
        except ModelNotFoundError as error:
            return error_response(404, "model_not_found", str(error))
        except (ModelLoadError, ValueError, OSError) as error:
            return error_response(422, "invalid_model", f"cannot read model {model!r}: {error}")

    def no_master() -> JSONResponse:
        return error_response(
            503,
            "no_master",
            f"no master answered within {command_timeout_s:g} s; the cluster may be electing",
        )

    @app.post(
        "/instances",
        response_model=None,
        status_code=201,
        responses={201: {"description": "The placed instance"}, **documented(404, 409, 503, 504)},
    )
    async def place_instance(body: PlaceBody) -> JSONResponse:
        card = await card_for(body.model)
        if isinstance(card, JSONResponse):
            return card
        try:
            request = PlacementRequest.model_validate(
                {**body.model_dump(exclude={"model"}), "model_id": card.model_id}, strict=False
            )
        except ValidationError as error:
            return invalid_response(error)
        reply = await node.submit(PlaceInstance(model=card, request=request))
        if reply is None:
            return no_master()
        if isinstance(reply, CommandRejected):
            return error_response(409, "placement_failed", reply.reason, command_id=reply.command_id)
        instance = await _created_instance(node, reply)
        if instance is None:
            return error_response(
                504, "not_replicated", "the instance was placed but has not reached this node"
            )
        return JSONResponse(instance_view(node.state, instance), status_code=201)

    @app.get("/instances")
    async def list_instances() -> dict[str, Any]:
        state = node.state
        return {"instances": [instance_view(state, i) for _, i in sorted(state.instances.items())]}

    @app.get("/instances/previews", response_model=None, responses=documented(404))
    async def preview_instances(
        model: str = Query(default="default"),
        kv_headroom_tokens: int | None = Query(default=None, ge=0),
        quant: WeightQuant = DEFAULT_WEIGHT_QUANT,
    ) -> JSONResponse:
        card = await card_for(model)
        if isinstance(card, JSONResponse):
            return card
        state = node.state
        found = previews(
            card,
            state.nodes,
            links_from_nodes(state.nodes),
            kv_headroom_tokens=kv_headroom_tokens,
            quant=quant,
            existing=state.instances.values(),
        )
        return JSONResponse(
            {
                "model": card.model_id,
                "previews": [{**p.model_dump(mode="json"), "total_bytes": p.total_bytes} for p in found],
            }
        )

    @app.get("/instances/{instance_id}", response_model=None, responses=documented(404))
    async def get_instance(instance_id: str) -> JSONResponse:
        state = node.state
        instance = state.instances.get(InstanceId(instance_id))
        if instance is None:
            return error_response(404, "instance_not_found", f"no instance {instance_id}")
        return JSONResponse(instance_view(state, instance))

    @app.delete("/instances/{instance_id}", response_model=None, responses=documented(404, 409, 503))
    async def delete_instance(instance_id: str) -> JSONResponse:
        if InstanceId(instance_id) not in node.state.instances:
            return error_response(404, "instance_not_found", f"no instance {instance_id}")
        try:
            command = DeleteInstance(instance_id=InstanceId(instance_id))
        except ValidationError as error:
            return invalid_response(error)
        reply = await node.submit(command)
        if reply is None:
            return no_master()
        if isinstance(reply, CommandRejected):
            return error_response(409, "command_rejected", reply.reason, command_id=reply.command_id)
        return JSONResponse({"deleted": instance_id, **reply.model_dump(mode="json")})

    @app.get("/models")
    async def models() -> dict[str, Any]:
        state = node.state
        placed: dict[str, list[str]] = {}
        for instance_id, instance in sorted(state.instances.items()):
            placed.setdefault(instance.card.model_id, []).append(instance_id)
        listed = await anyio.to_thread.run_sync(local_models, node.models_dir)
        entries = [
            {
                "id": model.model_id,
                "path": str(model.path),
                "embedded": model.embedded,
                "local": True,
                "instances": placed.pop(model.model_id, []),
            }
            for model in listed
        ]
        for model_id, instance_ids in placed.items():
            entries.append({"id": model_id, "local": False, "embedded": False, "instances": instance_ids})
        return {"models": entries}


async def _created_instance(node: InstanceNode, reply: CommandAccepted) -> Instance | None:
    with anyio.move_on_after(REPLICA_WAIT_S):
        while node.state.last_index < reply.last_index:
            await anyio.sleep(0.01)
    for indexed in node.read_events(reply.first_index, reply.last_index):
        if isinstance(indexed.event, InstanceCreated):
            return indexed.event.instance
    return None

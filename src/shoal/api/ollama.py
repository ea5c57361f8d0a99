"""The Ollama API on the node: `POST /api/chat`, `POST /api/generate` (NDJSON streams by default, one
object with `"stream": false`), `GET /api/tags`, `POST /api/show`, `GET /api/ps`, `GET /api/version`.

Inputs: Ollama request bodies (shapes and conversions in `shoal.api.ollama_models`); model names may
carry the `:latest` tag. Outputs: Ollama's objects; the last one of a generation has `done: true`,
`done_reason` and the counts and durations (ns). Errors are `{"error": "..."}`: 400 for what cannot be
honoured (also bodies that do not validate), 404 for an unknown model, 503 + Retry-After while it loads,
500 when the task failed (inside a stream: an `{"error"}` line, then the stream ends). A chat without
messages or a generate without prompt answers `done_reason: "load"` once the model is served, as Ollama
does. Tags lists the models placed in the cluster and the embedded one; ps the models being served.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from shoal import __version__
from shoal.api.ollama_models import (
    ChatBody,
    ErrorResponse,
    GenerateBody,
    OllamaLines,
    ShowBody,
    chat_prompt,
    details,
    generate_prompt,
    merged,
    model_entry,
    model_info,
    model_name,
    refuse_unsupported,
    sampling,
    timestamp,
    tool_specs,
)
from shoal.api.service import ApiProblem, Generation, GenerationRequest, GenerationService
from shoal.engine.embedded import EMBEDDED_MODEL_NAME
from shoal.engine.errors import ModelLoadError
from shoal.models import DEFAULT_MODEL, ModelNotFoundError, matches, resolve_model
from shoal.routing import NoInstance, pick_instance
from shoal.types import State
from shoal.types.instances import ModelCard
from shoal.types.runners import is_serving

log = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "a field shoal cannot take or honour"),
        (404, "no instance of the model"),
        (500, "the generation failed"),
        (503, "the model is loading (Retry-After)"),
    )
}
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "NDJSON objects as tokens arrive, or one object with `stream: false`",
        "content": {
            "application/x-ndjson": {"schema": {"type": "object"}},
            "application/json": {"schema": {"type": "object"}},
        },
    },
    **ERROR_RESPONSES,
}
# Instances stay until they are deleted; /api/ps needs some expiry time to show.
NEVER_EXPIRES = timedelta(days=365 * 100)


def ollama_error(status: int, message: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
    # A message may quote the request; lone surrogates in it could not be encoded as UTF-8 JSON.
    readable = message.encode("utf-8", "backslashreplace").decode()
    return JSONResponse({"error": readable}, status_code=status, headers=headers)


def problem_response(problem: ApiProblem) -> JSONResponse:
    return ollama_error(problem.status, problem.message, problem.retry_after_s)


def describe(error: ValidationError | RequestValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc'] if part != 'body') or 'body'}: {item['msg']}"
        for item in error.errors()
    )


class OllamaRoute(APIRoute):
    """Bodies that do not validate answer 400 {"error": ...}, not the node's 422. Bodies are read as JSON
    whatever their content type says, as Ollama does (`curl -d '{...}'` sends a form content type)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            headers = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"content-type"]
            request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
            try:
                return await handler(request)
            except RequestValidationError as error:
                return ollama_error(400, describe(error))

        return route


def placed_cards(state: State, serving_only: bool = False) -> dict[str, tuple[ModelCard, str]]:
    """model id -> (card, weight quant) of the models placed (or, with `serving_only`, served)."""
    found: dict[str, tuple[ModelCard, str]] = {}
    for _, instance in sorted(state.instances.items()):
        statuses = [state.runners.get(runner_id) for runner_id in instance.runner_ids]
        if serving_only and not all(status is not None and is_serving(status) for status in statuses):
            continue
        found.setdefault(instance.card.model_id, (instance.card, instance.quant))
    return found


def file_facts(card: ModelCard) -> tuple[int, datetime]:
    """(bytes on disk, last modified) of a model's files here; its weight bytes and now when absent."""
    path = Path(card.source)
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.glob("*") if p.is_file())
        if path.is_dir()
        else []
    )
    if not files:
        return card.weight_bytes, datetime.now(UTC)
    stats = [file.stat() for file in files]
    modified = datetime.fromtimestamp(max(stat.st_mtime for stat in stats), UTC)
    return sum(stat.st_size for stat in stats), modified


def add_ollama_routes(app: FastAPI, service: GenerationService) -> None:
    router = APIRouter(route_class=OllamaRoute, tags=["ollama"])
    embedded: list[ModelCard] = []  # read once, on first use

    async def embedded_card() -> ModelCard | None:
        if not embedded:
            try:
                embedded.append(await anyio.to_thread.run_sync(resolve_model, DEFAULT_MODEL, None))
            except (ModelNotFoundError, ModelLoadError) as error:
                log.info("the embedded model is not available: %s", error)
                return None
        return embedded[0]

    def loaded(model: str) -> JSONResponse:
        chosen = pick_instance(service.node.state, model_name(model), {})
        if isinstance(chosen, NoInstance):
            status = 503 if chosen.loading else 404
            return ollama_error(status, chosen.reason, 2 if chosen.loading else None)
        return JSONResponse({"model": model, "created_at": timestamp(), "done": True, "done_reason": "load"})

    @router.post("/api/chat", response_model=None, responses=GENERATION_RESPONSES)
    async def chat(body: ChatBody, http: Request) -> Response:
        if not body.messages:
            return loaded(body.model)
        try:
            refuse_unsupported(body)
            tools = tool_specs(body.tools)
            request = GenerationRequest(
                model_name(body.model), chat_prompt(body.messages), sampling(body.options), tools
            )
            started_ns = time.perf_counter_ns()
            generation = service.open(request, api="ollama", disconnected=http.is_disconnected)
        except ApiProblem as problem:
            return problem_response(problem)
        except ValidationError as error:
            return ollama_error(400, describe(error))
        lines = OllamaLines(body.model, chat=True, parse_tools=bool(tools), started_ns=started_ns)
        return await _respond(generation, lines, body.stream)

    @router.post("/api/generate", response_model=None, responses=GENERATION_RESPONSES)
    async def generate(body: GenerateBody, http: Request) -> Response:
        if not body.prompt and not body.system:
            return loaded(body.model)
        try:
            refuse_unsupported(body)
            request = GenerationRequest(model_name(body.model), generate_prompt(body), sampling(body.options))
            started_ns = time.perf_counter_ns()
            generation = service.open(request, api="ollama", disconnected=http.is_disconnected)
        except ApiProblem as problem:
            return problem_response(problem)
        except ValidationError as error:
            return ollama_error(400, describe(error))
        lines = OllamaLines(body.model, chat=False, started_ns=started_ns)
        return await _respond(generation, lines, body.stream)

    @router.get("/api/tags")
    async def tags() -> dict[str, Any]:
        cards = placed_cards(service.node.state)
        card = await embedded_card()
        if card is not None:
            cards.setdefault(card.model_id, (card, "none"))
        models = []
        for card, quant in cards.values():
            size, modified = await anyio.to_thread.run_sync(file_facts, card)
            models.append(model_entry(card, quant, size, modified))
        return {"models": models}

    @router.get("/api/ps")
    async def running() -> dict[str, Any]:
        now = datetime.now(UTC)
        models = [
            {
                **model_entry(card, quant, card.weight_bytes, now),
                "expires_at": timestamp(now + NEVER_EXPIRES),
                "size_vram": 0,
                "context_length": card.context_length,
            }
            for card, quant in placed_cards(service.node.state, serving_only=True).values()
        ]
        return {"models": models}

    @router.post(
        "/api/show",
        response_model=None,
        responses={**ERROR_RESPONSES, 200: {"description": "The model's details"}},
    )
    async def show(body: ShowBody) -> JSONResponse:
        asked = body.model or body.name
        if not asked:
            return ollama_error(400, "model: give the name of a model")
        name = model_name(asked)
        found = [entry for entry in placed_cards(service.node.state).values() if matches(name, entry[0])]
        if found:
            card, quant = found[0]
        elif name in (DEFAULT_MODEL, EMBEDDED_MODEL_NAME) and (local := await embedded_card()) is not None:
            card, quant = local, "none"
        else:
            return ollama_error(404, f"model {asked!r} not found: place it with POST /instances")
        _, modified = await anyio.to_thread.run_sync(file_facts, card)
        return JSONResponse(
            {
                "modelfile": "",
                "parameters": "",
                "template": "",
                "details": details(card, quant),
                "model_info": model_info(card),
                "capabilities": ["completion", "tools"],
                "modified_at": timestamp(modified),
            }
        )

    @router.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    app.include_router(router)


async def _respond(generation: Generation, lines: OllamaLines, stream: bool) -> Response:
    if stream:
        return StreamingResponse(
            _ndjson(generation, lines),
            media_type="application/x-ndjson",
            headers={"Cache-Control": "no-cache", "X-Shoal-Instance": generation.instance.instance_id},
        )
    out: list[dict[str, Any]] = []
    try:
        async for chunk in generation:
            if chunk is not None:
                out += lines.feed(chunk, time.perf_counter_ns())
            if lines.finished:
                break
    except Exception as error:
        # The top of this request: a broken task becomes an error the caller can read, never a bare 500.
        log.exception("ollama request on instance %s failed", generation.instance.instance_id)
        return ollama_error(500, f"{type(error).__name__}: {error}")
    finally:
        await generation.aclose()
    if not lines.finished:
        return ollama_error(500, "the generation ended without a finish")
    failure = generation.failure()
    if failure is not None:
        return ollama_error(failure.status, failure.message, failure.retry_after_s)
    return JSONResponse(merged(out))


async def _ndjson(generation: Generation, lines: OllamaLines) -> AsyncIterator[bytes]:
    try:
        async for chunk in generation:
            if chunk is None:
                continue  # NDJSON has no comment lines for keep-alives
            for line in lines.feed(chunk, time.perf_counter_ns()):
                yield _line(line)
            if lines.finished:
                break
        if not lines.finished:
            yield _line({"error": "the generation ended without a finish"})
    except Exception as error:
        # The top of this request's stream: whatever broke reaches the client as an error line.
        log.exception("ollama stream on instance %s failed", generation.instance.instance_id)
        yield _line({"error": f"{type(error).__name__}: {error}"})
    finally:
        await generation.aclose()  # a client that left: the router cancels the task on its runner


def _line(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload) + "\n").encode()

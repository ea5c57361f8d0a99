"""`POST /generate`: a minimal streaming generation endpoint (NDJSON), until the OpenAI-style API exists.

Body: {model, instance_id (optional: pin one instance), prompt (text or token ids) | messages [{role,
content}], and sampling fields (max_tokens,
temperature, top_p, top_k, min_p, penalties, seed, stop, stop_token_ids, ignore_eos)}.
Answers at once with 404 when no instance of the model is placed, 503 + Retry-After while one is still
loading, 400 for invalid sampling values. Otherwise a stream of lines:
  {"type": "delta", "text": ..., "token_ids": [...]}   as tokens arrive
  {"type": "finish", "finish_reason": ..., "usage": {"prompt_tokens": n, "completion_tokens": m}}
  {"type": "error", "message": ...}                    instead of finish, when the task failed
  {"type": "end"}                                      always last
A client that disconnects cancels the task on its runner.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from shoal.api.errors import error_response, invalid_response
from shoal.engine.errors import InvalidRequestError
from shoal.engine.sampling import SamplingParams
from shoal.routing import NoInstance, pick_instance
from shoal.task_router import TaskRouter
from shoal.types import State
from shoal.types.generation import ChatMessage, GenerationParams, Prompt
from shoal.types.instance_ids import InstanceId

RETRY_AFTER_S = 2
log = logging.getLogger(__name__)


class GenerateNode(Protocol):
    @property
    def state(self) -> State: ...

    @property
    def router(self) -> TaskRouter: ...


class MessageBody(BaseModel):
    role: str
    content: str


class GenerateBody(BaseModel):
    model: str = "default"
    instance_id: str | None = None
    prompt: str | list[int] | None = None
    messages: list[MessageBody] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    max_tokens: int = 256


def _line(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload) + "\n").encode()


def add_generate_route(app: FastAPI, node: GenerateNode) -> None:
    @app.post("/generate", response_model=None)
    async def generate(body: GenerateBody) -> JSONResponse | StreamingResponse:
        if (body.prompt is None) == (body.messages is None):
            return error_response(400, "invalid_request", "give exactly one of prompt and messages")
        fields = body.model_dump(exclude={"model", "instance_id", "prompt", "messages"})
        fields["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop or []
        try:
            params = GenerationParams.model_validate(fields, strict=False)
            SamplingParams(**params.model_dump())  # the engine's own checks, before anything is sent
            prompt: Prompt
            if body.messages is not None:
                prompt = tuple(ChatMessage(role=m.role, content=m.content) for m in body.messages)
            else:
                prompt = body.prompt if isinstance(body.prompt, str) else tuple(body.prompt or ())
        except ValidationError as error:
            return invalid_response(error)
        except InvalidRequestError as error:
            return error_response(400, "invalid_request", str(error), param=error.field)
        if isinstance(prompt, tuple) and not prompt:
            return error_response(400, "invalid_request", "the prompt is empty")
        router = node.router
        pinned = InstanceId(body.instance_id) if body.instance_id is not None else None
        chosen = pick_instance(node.state, body.model, router.in_flight, pinned)
        if isinstance(chosen, NoInstance):
            if chosen.loading:
                return error_response(
                    503, "model_loading", chosen.reason, headers={"Retry-After": str(RETRY_AFTER_S)}
                )
            return error_response(404, "model_not_found", chosen.reason)
        chunks = router.generate(chosen, prompt, params)

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    if chunk.text or chunk.token_ids:
                        yield _line({"type": "delta", "text": chunk.text, "token_ids": list(chunk.token_ids)})
                    if chunk.error is not None:
                        yield _line({"type": "error", "message": chunk.error})
                    elif chunk.finish_reason is not None:
                        usage = {
                            "prompt_tokens": chunk.prompt_tokens,
                            "completion_tokens": chunk.completion_tokens,
                        }
                        yield _line({"type": "finish", "finish_reason": chunk.finish_reason, "usage": usage})
            except Exception as error:
                # The top of this request's stream: whatever broke (e.g. the transport closing) reaches the
                # client as an error line, never as a silently cut stream.
                log.exception("generation stream on instance %s failed", chosen.instance_id)
                yield _line({"type": "error", "message": f"{type(error).__name__}: {error}"})
            finally:
                await chunks.aclose()  # a client that left: the router cancels the task on its runner
            yield _line({"type": "end"})

        return StreamingResponse(
            stream(),
            media_type="application/x-ndjson",
            headers={"Cache-Control": "no-cache", "X-Shoal-Instance": chosen.instance_id},
        )

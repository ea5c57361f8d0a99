"""`POST /generate`: a minimal streaming generation endpoint (NDJSON), until the OpenAI-style API exists.

Body: {model, instance_id (optional: pin one instance), prompt (text or token ids) | messages [{role,
content}], and sampling fields (max_tokens,
temperature, top_p, top_k, min_p, penalties, seed, stop, stop_token_ids, ignore_eos)}.
Answers at once with 404 when no instance of the model is placed, 503 + Retry-After while one is still
loading, 400 for invalid sampling values. Otherwise a stream of lines:
  {"type": "delta", "text": ..., "token_ids": [...], "logprobs": [...] (when asked)}   as tokens arrive
  {"type": "finish", "finish_reason": ..., "usage": {"prompt_tokens": n, "completion_tokens": m}}
  {"type": "error", "message": ...}                    instead of finish, when the task failed
  {"type": "end"}                                      always last
A client that disconnects cancels the task on its runner.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from shoal.api.errors import documented, error_response, invalid_response, streamed
from shoal.api.service import ApiProblem, GenerationRequest, GenerationService, generation_params
from shoal.types.generation import ChatMessage, Prompt

log = logging.getLogger(__name__)


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
    logprobs: bool = False
    top_logprobs: int = 0


def _line(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload) + "\n").encode()


def add_generate_route(app: FastAPI, service: GenerationService) -> None:
    @app.post(
        "/generate",
        response_model=None,
        responses={
            **streamed("application/x-ndjson", "Lines of deltas, then finish or error, then end"),
            **documented(400, 404, 503),
        },
    )
    async def generate(body: GenerateBody) -> JSONResponse | StreamingResponse:
        if (body.prompt is None) == (body.messages is None):
            return error_response(400, "invalid_request", "give exactly one of prompt and messages")
        fields = body.model_dump(exclude={"model", "instance_id", "prompt", "messages"})
        fields["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop or []
        try:
            params = generation_params(fields)
            prompt: Prompt
            if body.messages is not None:
                prompt = tuple(ChatMessage(role=m.role, content=m.content) for m in body.messages)
            else:
                prompt = body.prompt if isinstance(body.prompt, str) else tuple(body.prompt or ())
            request = GenerationRequest(body.model, prompt, params, instance_id=body.instance_id)
            generation = service.open(request, api="generate")
        except ValidationError as error:
            return invalid_response(error)
        except ApiProblem as problem:
            headers = {"Retry-After": str(problem.retry_after_s)} if problem.retry_after_s else None
            extra = {"param": problem.param} if problem.param else {}
            return error_response(problem.status, problem.kind, problem.message, headers=headers, **extra)

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in generation:
                    if chunk is None:
                        continue
                    if chunk.text or chunk.token_ids:
                        delta: dict[str, Any] = {
                            "type": "delta",
                            "text": chunk.text,
                            "token_ids": list(chunk.token_ids),
                        }
                        if chunk.logprobs:
                            delta["logprobs"] = [lp.model_dump() for lp in chunk.logprobs]
                        yield _line(delta)
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
                log.exception("generation stream on instance %s failed", generation.instance.instance_id)
                yield _line({"type": "error", "message": f"{type(error).__name__}: {error}"})
            finally:
                await generation.aclose()  # a client that left: the router cancels the task on its runner
            yield _line({"type": "end"})

        return StreamingResponse(
            stream(),
            media_type="application/x-ndjson",
            headers={"Cache-Control": "no-cache", "X-Shoal-Instance": generation.instance.instance_id},
        )

"""The SSE framing of a streamed answer (`sse_events`) over a real `Generation` fed with plain chunks:
keep-alive comments on quiet ticks, [DONE] always last, an error event when the task fails or its chunks
break off, and the task closed in every case."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator

import anyio

from shoal.api.metrics import ApiMetrics
from shoal.api.openai import DONE, KEEPALIVE, sse_events
from shoal.api.openai_shaping import ChatStream, CompletionStream
from shoal.api.service import Generation
from shoal.types import State
from shoal.types.generation import GenerationChunk
from shoal.types.instances import Instance


def _generation(items: list[GenerationChunk | Exception | None]) -> tuple[Generation, list[str]]:
    closed: list[str] = []

    async def chunks() -> AsyncGenerator[GenerationChunk | None, None]:
        try:
            for item in items:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            closed.append("closed")

    generation = Generation(
        instance=Instance.model_construct(instance_id="inst-test"),
        api="openai",
        model="default",
        _chunks=chunks(),
        _metrics=ApiMetrics(State, dict),
    )
    return generation, closed


def _events(generation: Generation, stream: ChatStream | CompletionStream) -> list[bytes]:
    async def collect() -> list[bytes]:
        return [event async for event in sse_events(generation, stream)]

    return anyio.run(collect)


def _chat_stream() -> ChatStream:
    return ChatStream("chatcmpl-x", 1, "default", parse_tools=False, logprobs=False, include_usage=True)


def test_a_stream_with_a_quiet_tick_and_usage() -> None:
    generation, closed = _generation(
        [
            None,
            GenerationChunk(text="Hel", token_ids=(1,)),
            GenerationChunk(
                text="lo", token_ids=(2,), finish_reason="stop", prompt_tokens=9, completion_tokens=2
            ),
        ]
    )
    events = _events(generation, _chat_stream())
    assert events[1] == KEEPALIVE and events[-1] == DONE
    data = [json.loads(event.removeprefix(b"data: ")) for event in events if event not in (KEEPALIVE, DONE)]
    assert [d["choices"][0]["delta"].get("content") for d in data[:3]] == ["", "Hel", "lo"]
    assert data[3]["choices"][0]["finish_reason"] == "stop"
    assert data[4]["choices"] == [] and data[4]["usage"]["total_tokens"] == 11
    assert closed == ["closed"]


def test_a_failed_task_ends_with_an_error_event_then_done() -> None:
    generation, closed = _generation(
        [GenerationChunk(text="a", token_ids=(1,)), GenerationChunk(error="runner r1 died")]
    )
    events = _events(
        generation, CompletionStream("cmpl-x", 1, "default", logprobs=False, include_usage=False)
    )
    assert events[-1] == DONE
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    assert error["type"] == "server_error" and "runner r1 died" in error["message"]
    assert json.loads(events[0].removeprefix(b"data: "))["choices"][0]["text"] == "a"
    assert closed == ["closed"]


def test_chunks_that_break_off_or_stop_short_are_errors_too() -> None:
    broken, closed = _generation([GenerationChunk(text="a", token_ids=(1,)), RuntimeError("link lost")])
    events = _events(broken, _chat_stream())
    assert (
        events[-1] == DONE
        and "link lost" in json.loads(events[-2].removeprefix(b"data: "))["error"]["message"]
    )
    assert closed == ["closed"]
    short, _ = _generation([GenerationChunk(text="a", token_ids=(1,))])
    events = _events(short, _chat_stream())
    assert events[-1] == DONE and "without finishing" in events[-2].decode()

"""The OpenAI-compatible API on a live node, driven by the official `openai` client (and httpx where the
client hides what is checked): chat and text completions, streaming and not, logprobs, usage, stop, seed,
tools, models, errors in OpenAI's shape, and tokens that really stream."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from tests.api.conftest import Served
from tests.runner.tiny_model_dir import write_tiny_model_dir

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{served.url}/v1", api_key=served.api_key, max_retries=0, timeout=60
    ) as client:
        yield client


def test_chat_answer_and_its_stream_agree(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=12)
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    assert answer.model == "default" and answer.created > 0
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.completion_tokens <= 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=QUESTION,
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == choice.message.content  # greedy: the same answer both ways
    finishing = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishing[-1] == choice.finish_reason and not any(finishing[:-1])
    *before, last = chunks
    assert last.choices == [] and last.usage is not None
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(last.usage, name) for name in counts] == [getattr(answer.usage, name) for name in counts]
    assert all(chunk.usage is None for chunk in before)


def test_the_first_token_arrives_before_the_stream_ends(client: openai.OpenAI) -> None:
    started = time.perf_counter()
    arrivals = []
    stream = client.chat.completions.create(
        model="default",
        messages=QUESTION,
        temperature=0,
        max_tokens=24,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - started)
    ended = time.perf_counter() - started
    assert len(arrivals) >= 12  # tokens come in many chunks, not one at the end
    # 23 decode steps separate the first token from the end; each takes milliseconds at least.
    assert arrivals[0] < ended - 0.05, (arrivals[0], ended)


def test_chat_logprobs_streamed_and_not(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="default", messages=QUESTION, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    (choice,) = answer.choices
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert answer.usage is not None and len(entries) == answer.usage.completion_tokens
    assert "".join(entry.token for entry in entries) == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy

    chunks = list(
        client.chat.completions.create(
            model="default", messages=QUESTION, temperature=0, max_tokens=6, logprobs=True, stream=True
        )
    )
    streamed = [
        entry
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert all(entry.top_logprobs == [] for entry in streamed)


def test_text_completion_with_legacy_logprobs(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    answer = client.completions.create(
        model="default", prompt=prompt, temperature=0, max_tokens=6, logprobs=2
    )
    assert answer.id.startswith("cmpl-") and answer.object == "text_completion"
    (choice,) = answer.choices
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    tokens, offsets = choice.logprobs.tokens, choice.logprobs.text_offset
    assert "".join(tokens) == choice.text and len(tokens) == 6 == answer.usage.completion_tokens  # type: ignore[union-attr]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    for token, logprob, top in zip(
        tokens, choice.logprobs.token_logprobs or [], choice.logprobs.top_logprobs or [], strict=True
    ):
        assert top is not None and token in top and top[token] == logprob and 2 <= len(top) <= 3

    stream = client.completions.create(
        model="default", prompt=prompt, temperature=0, max_tokens=6, stream=True, logprobs=1
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    streamed_offsets = [
        o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset or []
    ]
    assert streamed_offsets == offsets


def test_usage_counts_prompt_and_cached_tokens(client: openai.OpenAI) -> None:
    long_prompt = "Here is a list of fruits: " + ", ".join(["apple", "pear", "plum", "fig"] * 20) + "."
    first = client.completions.create(model="default", prompt=long_prompt, temperature=0, max_tokens=2)
    again = client.completions.create(model="default", prompt=long_prompt, temperature=0, max_tokens=2)
    short = client.completions.create(model="default", prompt="Fruits:", temperature=0, max_tokens=2)
    assert first.usage is not None and again.usage is not None and short.usage is not None
    assert first.usage.prompt_tokens == again.usage.prompt_tokens > short.usage.prompt_tokens + 50
    details = again.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens > 0  # the prefix cache kept the first request's blocks


def test_stop_strings_end_the_answer(client: openai.OpenAI) -> None:
    prompt = "1, 2, 3, 4, 5, 6, 7,"
    free = client.completions.create(model="default", prompt=prompt, temperature=0, max_tokens=12)
    text = free.choices[0].text
    assert "9" in text, text
    stopped = client.completions.create(
        model="default", prompt=prompt, temperature=0, max_tokens=12, stop=["9", "never"]
    )
    assert stopped.choices[0].text == text[: text.index("9")]
    assert stopped.choices[0].finish_reason == "stop"
    single = client.completions.create(model="default", prompt=prompt, temperature=0, max_tokens=12, stop="9")
    assert single.choices[0].text == stopped.choices[0].text


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str | None:
        answer = client.chat.completions.create(
            model="default", messages=QUESTION, temperature=1.0, max_tokens=12, seed=seed
        )
        return answer.choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


def test_max_completion_tokens_caps_the_answer(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="default", messages=QUESTION, max_completion_tokens=5, extra_body={"ignore_eos": True}
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    assert answer.choices[0].finish_reason == "length"
    # max_completion_tokens wins over the older max_tokens
    both = client.chat.completions.create(
        model="default",
        messages=QUESTION,
        max_tokens=9,
        max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert both.usage is not None and both.usage.completion_tokens == 3


def test_tools_reach_the_prompt_and_calls_are_parsed(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the weather in Paris? Use the tool."}
    ]
    plain = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=40)
    offered = client.chat.completions.create(
        model="default", messages=messages, temperature=0, max_tokens=40, tools=[WEATHER_TOOL]
    )
    dropped = client.chat.completions.create(
        model="default",
        messages=messages,
        temperature=0,
        max_tokens=40,
        tools=[WEATHER_TOOL],
        tool_choice="none",
    )
    assert plain.usage is not None and offered.usage is not None and dropped.usage is not None
    assert offered.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    assert dropped.usage.prompt_tokens == plain.usage.prompt_tokens
    (choice,) = offered.choices
    calls = choice.message.tool_calls or []
    if calls:  # whether the 135M model calls the tool is up to it; what it calls must be well formed
        assert choice.finish_reason == "tool_calls"
        for call in calls:
            assert call.id.startswith("call_") and call.type == "function"
            assert call.function.name and isinstance(json.loads(call.function.arguments), dict)
    else:
        assert choice.finish_reason in ("stop", "length") and "<tool_call>" not in (
            choice.message.content or ""
        )


def test_a_conversation_with_a_call_and_its_result(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    answer = client.chat.completions.create(
        model="default",
        messages=messages,
        tools=[WEATHER_TOOL],
        temperature=0,
        max_tokens=8,
        user="someone",
        metadata={"ignored": "yes"},  # fields the node does not use are ignored
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage is not None and answer.usage.prompt_tokens > 40


def test_models_are_listed(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert "default" in ids
    assert client.models.retrieve("default").id == "default"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_errors_have_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert missing.value.code == "model_not_found" and missing.value.type == "invalid_request_error"
    cases: list[tuple[dict[str, object], str]] = [
        ({"temperature": -1}, "temperature"),
        ({"n": 2}, "n"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "required"}, "tool_choice"),
        ({"top_p": 0}, "top_p"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as invalid:
            client.chat.completions.create(model="default", messages=QUESTION, max_tokens=2, **extra)  # type: ignore[call-overload]
        assert invalid.value.param == param, (extra, invalid.value.body)
        assert invalid.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as n_completions:
        client.completions.create(model="default", prompt="Hi", n=2)
    assert n_completions.value.param == "n"


def test_malformed_bodies_are_400_naming_the_field(served: Served) -> None:
    url = f"{served.url}/v1/chat/completions"
    cases = [
        ({"model": "default"}, "messages"),
        ({"model": "default", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.[0].role"),
        ({"model": "default", "messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
        (
            {"model": "default", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.[0].content",
        ),
        ({"model": "default", "messages": [{"role": "tool", "content": "x"}]}, "messages.[0].tool_call_id"),
        ({"model": "default", "messages": [{"role": "user", "content": "x"}], "seed": 2**64}, "seed"),
    ]
    for body, param in cases:
        response = httpx.post(url, json=body, headers=served.headers, timeout=10)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param, response.text
    garbage = httpx.post(url, content=b"{not json", headers=served.headers, timeout=10)
    assert garbage.status_code == 400 and garbage.json()["error"]["type"] == "invalid_request_error"
    unauthorized = httpx.post(url, json=cases[0][0], timeout=10)
    assert unauthorized.status_code == 401 and "message" in unauthorized.json()["error"]


def test_token_ids_beyond_the_vocabulary_are_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="default", prompt=[1, 49152], max_tokens=2)
    assert refused.value.param == "prompt" and "49152" in refused.value.message


def test_a_task_that_fails_is_an_error_never_a_200(served: Served, client: openai.OpenAI) -> None:
    # a prompt longer than the runner's context window passes the node's checks and is refused by the
    # runner: a 400 before anything streamed, an error event (of the request's kind) inside a stream
    too_long = [1] * 9000
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="default", prompt=too_long, max_tokens=2)
    assert "context window" in refused.value.message
    body = {"model": "default", "prompt": too_long, "max_tokens": 2, "stream": True}
    with httpx.stream(
        "POST", f"{served.url}/v1/completions", json=body, headers=served.headers, timeout=30
    ) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "invalid_request_error" and "9000" in error["message"]
    with pytest.raises(openai.APIError):
        list(client.completions.create(model="default", prompt=too_long, max_tokens=2, stream=True))


def test_a_model_still_loading_is_503_with_retry_after(
    served: Served, tmp_path: Path, client: openai.OpenAI
) -> None:
    model = str(write_tiny_model_dir(tmp_path / "tiny-llama"))
    placed = httpx.post(f"{served.url}/instances", json={"model": model}, headers=served.headers, timeout=30)
    assert placed.status_code == 201, placed.text
    try:
        # the runner is still starting (its process imports torch): the model is placed but not ready
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        response = httpx.post(
            f"{served.url}/v1/chat/completions", json=body, headers=served.headers, timeout=10
        )
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) > 0
        error = response.json()["error"]
        assert error["code"] == "model_loading" and "loading" in error["message"]
        # placed models are listed (by their id: the folder's name)
        assert "tiny-llama" in [listed.id for listed in client.models.list()]
    finally:
        instance_id = placed.json()["instance_id"]
        httpx.delete(f"{served.url}/instances/{instance_id}", headers=served.headers, timeout=30)

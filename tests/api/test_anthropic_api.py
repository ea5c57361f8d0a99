"""The Anthropic Messages API: its shaping on plain data (prompts, tools, stop reasons, the event stream),
then a live node driven by the official `anthropic` client and by raw HTTP for the event framing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from shoal.api.anthropic import problem_response
from shoal.api.anthropic_models import (
    InputMessage,
    MessageEvents,
    TextBlock,
    Tool,
    ToolChoice,
    chat_prompt,
    matched_stop_sequence,
    message_outcome,
    tool_specs,
)
from shoal.api.service import ApiProblem
from shoal.types.generation import ChatMessage, GenerationChunk, TokenLogprobs, ToolCall
from tests.api.conftest import Served

WEATHER = Tool(
    name="get_weather",
    description="The weather in a city",
    input_schema={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def _lp(*tokens: str) -> list[TokenLogprobs]:
    return [TokenLogprobs(token_id=i, token=t, logprob=-0.1) for i, t in enumerate(tokens)]


# --- shaping on plain data ---------------------------------------------------------------------------


def test_conversation_with_tool_use_and_results_becomes_chat_messages() -> None:
    messages = [
        InputMessage(role="user", content="Weather in Paris?"),
        InputMessage.model_validate(
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            }
        ),
        InputMessage.model_validate(
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "sun"}],
                    },
                    {"type": "text", "text": "And tomorrow?"},
                ],
            }
        ),
    ]
    prompt = chat_prompt([TextBlock(type="text", text="Be brief.")], messages)
    assert prompt == (
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(
            role="assistant",
            content="Let me look.",
            tool_calls=(ToolCall(id="toolu_1", name="get_weather", arguments='{"city": "Paris"}'),),
        ),
        ChatMessage(role="tool", content="sun", tool_call_id="toolu_1"),
        ChatMessage(role="user", content="And tomorrow?"),
    )


def test_prefill_and_forced_tool_choices_are_refused_not_faked() -> None:
    with pytest.raises(ApiProblem) as refused:
        chat_prompt(
            None, [InputMessage(role="user", content="Hi"), InputMessage(role="assistant", content="He")]
        )
    assert refused.value.status == 400 and "prefill" in refused.value.message
    for choice in ("any", "tool"):
        with pytest.raises(ApiProblem) as forced:
            tool_specs([WEATHER], ToolChoice(type=choice, name="get_weather"))
        assert forced.value.status == 400 and forced.value.param == "tool_choice"
    assert tool_specs([WEATHER], ToolChoice(type="none")) == ()
    (spec,) = tool_specs([WEATHER], None)
    assert spec.name == "get_weather" and json.loads(spec.parameters) == WEATHER.input_schema


def test_stop_sequence_is_told_apart_from_end_of_turn() -> None:
    stops = ["END", "<"]
    # the last token completed "END": the text stops right before it
    assert matched_stop_sequence("one two ", _lp("one", " two", " E", "ND"), stops) == "END"
    # an end-of-sequence token: not decoded into the text, so no stop sequence ended it
    assert matched_stop_sequence("one two", _lp("one", " two", "<|im_end|>"), ["END"]) is None
    # a stop sequence spanning the boundary with an end-of-sequence token's text is not a match
    assert matched_stop_sequence("a two", _lp("a", " two", "<|im_end|>"), ["o<"]) is None
    assert matched_stop_sequence("text", [], stops) is None
    result = message_outcome("one two ", _lp("one", " two", " E", "ND"), "stop", stops, parse_tools=False)
    assert (result.stop_reason, result.stop_sequence, result.text) == ("stop_sequence", "END", "one two ")
    assert message_outcome("abc", [], "length", [], parse_tools=False).stop_reason == "max_tokens"
    assert message_outcome("abc", [], "stop", [], parse_tools=False).stop_reason == "end_turn"


def test_tool_call_text_becomes_tool_use_blocks() -> None:
    text = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    result = message_outcome(text, [], "stop", [], parse_tools=True)
    assert result.stop_reason == "tool_use" and result.text == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in result.calls] == [("get_weather", {"city": "Oslo"})]
    # without tools offered, the same text is just text
    plain = message_outcome(text, [], "stop", [], parse_tools=False)
    assert plain.stop_reason == "end_turn" and plain.text == text


def _events(chunks: list[GenerationChunk | None], parse_tools: bool) -> list[tuple[str, dict[str, Any]]]:
    stream = MessageEvents("msg_1", "default", parse_tools=parse_tools)
    events = stream.start()
    for chunk in chunks:
        events += stream.feed(chunk)
    return events


def test_stream_events_for_text_then_a_tool_call() -> None:
    chunks: list[GenerationChunk | None] = [
        GenerationChunk(text="Sure. ", token_ids=(1, 2)),
        None,
        GenerationChunk(text='<tool_call>{"name": "get_weather", ', token_ids=(3,)),
        GenerationChunk(
            text='"arguments": {"city": "Oslo"}}</tool_call>',
            token_ids=(4, 5),
            finish_reason="stop",
            prompt_tokens=30,
            completion_tokens=5,
            cached_tokens=10,
        ),
    ]
    events = _events(chunks, parse_tools=True)
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "ping",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "Sure. "}
    tool_start, tool_delta = events[6][1], events[7][1]
    assert tool_start["index"] == 1 and tool_start["content_block"]["type"] == "tool_use"
    assert tool_start["content_block"]["name"] == "get_weather" and tool_start["content_block"]["input"] == {}
    assert tool_delta["delta"]["type"] == "input_json_delta"
    assert json.loads(tool_delta["delta"]["partial_json"]) == {"city": "Oslo"}
    ending = events[9][1]
    assert ending["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert ending["usage"]["input_tokens"] == 20 and ending["usage"]["cache_read_input_tokens"] == 10
    assert ending["usage"]["output_tokens"] == 5


def test_a_failed_task_ends_the_stream_with_an_error_event() -> None:
    chunks: list[GenerationChunk | None] = [
        GenerationChunk(text="Hel", token_ids=(1,)),
        GenerationChunk(error="runner died"),
    ]
    events = _events(chunks, parse_tools=False)
    assert [name for name, _ in events][-1] == "error"
    assert events[-1][1] == {"type": "error", "error": {"type": "api_error", "message": "runner died"}}
    assert "message_stop" not in [name for name, _ in events]


def test_refusals_map_to_anthropic_errors_with_retry_after() -> None:
    loading = problem_response(ApiProblem(503, "model_loading", "loading", retry_after_s=2))
    assert loading.status_code == 503 and loading.headers["retry-after"] == "2"
    assert json.loads(loading.body) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "loading"},
    }
    missing = problem_response(ApiProblem(404, "model_not_found", "no model 'x\udad9'"))
    assert json.loads(missing.body)["error"] == {"type": "not_found_error", "message": "no model 'x\\udad9'"}
    assert "retry-after" not in missing.headers


# --- a live node --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=served.url, api_key=served.api_key, max_retries=0, timeout=60) as c:
        yield c


# This client has no sampling arguments (the API moved them out); the node still takes them.
GREEDY = {"temperature": 0}


def _prompt(answer: anthropic.types.Message) -> int:
    """All the prompt's tokens: Anthropic counts those read from the prefix cache apart."""
    return answer.usage.input_tokens + (answer.usage.cache_read_input_tokens or 0)


COUNT = [{"role": "user", "content": "Count from 1 to 30, separated by spaces."}]


def test_message_with_system_prompt_and_usage(client: anthropic.Anthropic) -> None:
    answers = [
        client.messages.create(
            model="default", max_tokens=6, extra_body=GREEDY, system=system, messages=COUNT
        )
        for system in ("Count.", "You are a careful assistant who counts numbers out loud, one by one.")
    ]
    for answer in answers:
        assert answer.type == "message" and answer.role == "assistant" and answer.model == "default"
        assert answer.content[0].type == "text" and answer.content[0].text
        assert answer.stop_reason == "max_tokens" and answer.usage.output_tokens == 6
    short, long = (_prompt(answer) for answer in answers)
    assert long > short + 8 > 8  # the system prompt reached the model's prompt


def test_stop_sequence_ends_the_message(client: anthropic.Anthropic) -> None:
    free = client.messages.create(model="default", max_tokens=12, extra_body=GREEDY, messages=COUNT)
    text = free.content[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    cut = client.messages.create(
        model="default", max_tokens=12, extra_body=GREEDY, messages=COUNT, stop_sequences=[stop]
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]
    with client.messages.stream(
        model="default", max_tokens=12, extra_body=GREEDY, messages=COUNT, stop_sequences=["zzz", stop]
    ) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "stop_sequence" and streamed.stop_sequence == stop
    assert streamed.content[0].text == cut.content[0].text


def test_streamed_message_equals_the_unstreamed_one(client: anthropic.Anthropic) -> None:
    expected = client.messages.create(model="default", max_tokens=16, extra_body=GREEDY, messages=COUNT)
    arrivals: list[float] = []
    with client.messages.stream(model="default", max_tokens=16, extra_body=GREEDY, messages=COUNT) as stream:
        for _ in stream.text_stream:
            arrivals.append(time.monotonic())
        final = stream.get_final_message()
    ended = time.monotonic()
    assert len(arrivals) > 1 and ended - arrivals[0] > 0.02  # tokens arrive as they are made
    assert final.content[0].type == "text" and final.content[0].text == expected.content[0].text
    assert final.stop_reason == expected.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 16
    assert _prompt(final) == _prompt(expected)


def test_raw_event_framing_and_first_token_before_the_end(served: Served) -> None:
    body = {"model": "default", "max_tokens": 24, "temperature": 0, "messages": COUNT, "stream": True}
    names: list[str] = []
    first_delta_at = stop_at = 0.0
    with httpx.stream(
        "POST", f"{served.url}/v1/messages", json=body, headers=served.headers, timeout=60
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
                names.append(event)
            elif line.startswith("data: "):
                assert json.loads(line.removeprefix("data: "))["type"] == event
                if event == "content_block_delta" and not first_delta_at:
                    first_delta_at = time.monotonic()
                if event == "message_stop":
                    stop_at = time.monotonic()
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert names.count("content_block_delta") > 1
    assert first_delta_at > 0 and stop_at - first_delta_at > 0.02  # not all at once at the end


def test_tools_reach_the_prompt_and_tool_turns_are_accepted(client: anthropic.Anthropic) -> None:
    question = [{"role": "user", "content": "What is the weather in Oslo?"}]
    bare = client.messages.create(model="default", max_tokens=1, extra_body=GREEDY, messages=question)
    tool = WEATHER.model_dump()
    offered = client.messages.create(
        model="default", max_tokens=1, extra_body=GREEDY, messages=question, tools=[tool]
    )
    assert _prompt(offered) > _prompt(bare) + 20
    withheld = client.messages.create(
        model="default",
        max_tokens=1,
        extra_body=GREEDY,
        messages=question,
        tools=[tool],
        tool_choice={"type": "none"},
    )
    assert _prompt(withheld) == _prompt(bare)
    turns: list[Any] = [
        *question,
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"}],
        },
    ]
    answer = client.messages.create(
        model="default", max_tokens=4, extra_body=GREEDY, messages=turns, tools=[tool]
    )
    assert _prompt(answer) > _prompt(offered)
    with pytest.raises(anthropic.BadRequestError, match="force a tool call"):
        client.messages.create(
            model="default", max_tokens=4, messages=question, tools=[tool], tool_choice={"type": "any"}
        )


def test_count_tokens_matches_the_message_usage(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model="default", system="Be brief.", messages=COUNT)
    answer = client.messages.create(model="default", max_tokens=1, system="Be brief.", messages=COUNT)
    assert counted.input_tokens == _prompt(answer) > 0


def test_errors_in_anthropic_shape(client: anthropic.Anthropic, served: Served) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=4, messages=COUNT)
    assert missing.value.status_code == 404
    body = missing.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "not_found_error" and "no-such-model" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        client.messages.create(model="default", max_tokens=4, extra_body={"temperature": 1.5}, messages=COUNT)
    with pytest.raises(anthropic.BadRequestError, match="top_k"):
        client.messages.create(model="default", max_tokens=4, extra_body={"top_k": -5}, messages=COUNT)
    schema = {"type": "json_schema", "schema": {"type": "object"}}
    with pytest.raises(anthropic.BadRequestError, match="structured output"):
        client.messages.create(
            model="default", max_tokens=4, messages=COUNT, output_config={"format": schema}
        )
    no_max = httpx.post(
        f"{served.url}/v1/messages",
        json={"model": "default", "messages": COUNT},
        headers=served.headers,
        timeout=10,
    )
    assert no_max.status_code == 400
    assert no_max.json()["type"] == "error" and no_max.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in no_max.json()["error"]["message"]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}}
    with pytest.raises(anthropic.BadRequestError, match="image"):
        client.messages.create(model="default", max_tokens=4, messages=[{"role": "user", "content": [image]}])
    with pytest.raises(anthropic.BadRequestError, match="NUL"):
        client.messages.create(model="default\x00", max_tokens=4, messages=COUNT)


def _metric(text: str, name: str, **labels: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items())
    )


def test_a_client_that_leaves_mid_stream_cancels_its_task(served: Served) -> None:
    long_count = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]
    body = {"model": "default", "max_tokens": 2000, "messages": long_count, "stream": True, **GREEDY}
    with httpx.stream(
        "POST", f"{served.url}/v1/messages", json=body, headers=served.headers, timeout=60
    ) as sse:
        for line in sse.iter_lines():
            if line == "event: content_block_delta":
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(f"{served.url}/metrics", headers=served.headers, timeout=5).text
        if _metric(text, "shoal_runner_tasks") == 0 and _metric(text, "shoal_requests_in_flight") == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the task was not cancelled:\n{text}")
    assert _metric(text, "shoal_requests_total", api="anthropic", outcome="cancelled") >= 1

"""The OpenAI response shaping on plain chunks: streamed and whole tool calls, logprobs, usage and errors,
checked against the official client's own types (and its stream accumulator)."""

from __future__ import annotations

import json

import openai.types as openai_types
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion as ClientChatCompletion
from openai.types.chat import ChatCompletionChunk as ClientChunk

from shoal.api.openai import error_param, served_models
from shoal.api.openai_models import ChatCompletionChunk
from shoal.api.openai_shaping import (
    ChatStream,
    CompletionStream,
    chat_completion,
    completion,
    problem_response,
    usage,
)
from shoal.api.service import ApiProblem
from shoal.types.generation import GenerationChunk, TokenLogprobs, TopLogprob

CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
USAGE = usage(prompt_tokens=30, completion_tokens=7, cached_tokens=16)


def _stream(parse_tools: bool, include_usage: bool = False) -> ChatStream:
    return ChatStream(
        "chatcmpl-x", 1700000000, "default", parse_tools, logprobs=False, include_usage=include_usage
    )


def _client_chunks(chunks: list[ChatCompletionChunk]) -> list[ClientChunk]:
    return [ClientChunk.model_validate(json.loads(chunk.model_dump_json())) for chunk in chunks]


def test_streamed_tool_call_becomes_tool_call_deltas() -> None:
    stream = _stream(parse_tools=True)
    pieces = [
        "Let me check. ",
        "<tool",
        '_call>{"name": "get_weather", ',
        '"arguments": {"city": "Paris"}}',
        "</tool_call>",
    ]
    out = stream.start()
    for piece in pieces:
        out += stream.feed(GenerationChunk(text=piece, token_ids=(1,)))
    out += stream.finish("stop", USAGE)
    sent = [json.loads(chunk.model_dump_json()) for chunk in out]
    assert sent[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = "".join(c["choices"][0]["delta"].get("content", "") for c in sent)
    assert contents == "Let me check. "  # the call's text is never shown as content
    (call_chunk,) = [c for c in sent if "tool_calls" in c["choices"][0]["delta"]]
    (delta,) = call_chunk["choices"][0]["delta"]["tool_calls"]
    assert delta["index"] == 0 and delta["type"] == "function" and delta["id"].startswith("call_")
    assert delta["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert sent[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }

    # the official client's accumulator makes the same answer of them
    state = ChatCompletionStreamState()
    for chunk in _client_chunks(out):
        state.handle_chunk(chunk)
    final = state.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and final.message.content == "Let me check. "
    (call,) = final.message.tool_calls or []
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_streamed_text_without_tools_is_content_and_usage_comes_last() -> None:
    stream = _stream(parse_tools=False, include_usage=True)
    out = stream.start() + stream.feed(GenerationChunk(text=CALL_TEXT, token_ids=(1,)))
    out += stream.feed(GenerationChunk(token_ids=()))  # nothing to send
    out += stream.finish("length", USAGE)
    chunks = _client_chunks(out)
    assert len(chunks) == 4
    assert chunks[1].choices[0].delta.content == CALL_TEXT  # tools not offered: text stays text
    assert chunks[2].choices[0].finish_reason == "length" and chunks[2].usage is None
    assert chunks[3].choices == [] and chunks[3].usage is not None
    assert chunks[3].usage.total_tokens == 37
    assert chunks[3].usage.prompt_tokens_details is not None
    assert chunks[3].usage.prompt_tokens_details.cached_tokens == 16


def test_streamed_text_that_only_looks_like_a_call_is_content_in_the_end() -> None:
    stream = _stream(parse_tools=True)
    out = stream.feed(GenerationChunk(text="{not json", token_ids=(1,)))
    assert out == []  # held back: it could have been a bare JSON call
    out = stream.finish("stop", USAGE)
    assert out[0].choices[0].delta.content == "{not json"
    assert out[-1].choices[0].finish_reason == "stop"


def test_whole_answer_with_a_tool_call() -> None:
    answer = chat_completion(
        "chatcmpl-x", 1, "default", "Sure. " + CALL_TEXT, None, "stop", USAGE, parse_tools=True
    )
    parsed = ClientChatCompletion.model_validate(answer.model_dump(mode="json"))
    (choice,) = parsed.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    only_call = chat_completion("chatcmpl-x", 1, "default", CALL_TEXT, None, "stop", USAGE, parse_tools=True)
    assert only_call.choices[0].message.content is None
    untouched = chat_completion("chatcmpl-x", 1, "default", CALL_TEXT, None, "stop", USAGE, parse_tools=False)
    assert untouched.choices[0].message.content == CALL_TEXT and untouched.choices[0].finish_reason == "stop"


def _entry(token: str, logprob: float) -> TokenLogprobs:
    alternatives = (
        TopLogprob(token_id=2, token=token, logprob=logprob),
        TopLogprob(token_id=3, token="x", logprob=-3.0),
    )
    return TokenLogprobs(token_id=2, token=token, logprob=logprob, top=alternatives)


def test_chat_logprobs_shape() -> None:
    entries = [_entry("Par", -0.5), _entry("ís", -0.25)]
    answer = chat_completion("chatcmpl-x", 1, "default", "París", entries, "stop", USAGE, parse_tools=False)
    parsed = ClientChatCompletion.model_validate(answer.model_dump(mode="json"))
    logprobs = parsed.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [e.token for e in logprobs.content] == ["Par", "ís"]
    assert logprobs.content[1].bytes == list("ís".encode())
    assert [t.token for t in logprobs.content[0].top_logprobs] == ["Par", "x"]


def test_completion_logprobs_offsets_follow_the_text_and_the_echo() -> None:
    entries = [_entry(" Paris", -0.5), _entry(".", -0.1)]
    whole = completion("cmpl-x", 1, "default", " Paris.", entries, "stop", USAGE, echo="Capital:")
    parsed = openai_types.Completion.model_validate(whole.model_dump(mode="json"))
    logprobs = parsed.choices[0].logprobs
    assert parsed.choices[0].text == "Capital: Paris."
    assert logprobs is not None and logprobs.text_offset == [8, 14]
    assert logprobs.top_logprobs == [{" Paris": -0.5, "x": -3.0}, {".": -0.1, "x": -3.0}]

    stream = CompletionStream("cmpl-x", 1, "default", logprobs=True, include_usage=False, echo="Capital:")
    out = stream.start()
    out += stream.feed(GenerationChunk(text=" Paris", token_ids=(2,), logprobs=(entries[0],)))
    out += stream.feed(GenerationChunk(text=".", token_ids=(2,), logprobs=(entries[1],)))
    out += stream.finish("stop", USAGE)
    assert [c.choices[0].text for c in out] == ["Capital:", " Paris", ".", ""]
    assert [c.choices[0].logprobs.text_offset for c in out[1:3] if c.choices[0].logprobs] == [[8], [14]]
    assert out[-1].choices[0].finish_reason == "stop"


def test_problems_map_to_openai_errors() -> None:
    loading = problem_response(ApiProblem(503, "model_loading", "model 'x' is loading", retry_after_s=2))
    assert loading.status_code == 503 and loading.headers["Retry-After"] == "2"
    assert json.loads(bytes(loading.body))["error"] == {
        "message": "model 'x' is loading",
        "type": "server_error",
        "param": None,
        "code": "model_loading",
    }
    missing = problem_response(ApiProblem(404, "model_not_found", "no such model", param="model"))
    body = json.loads(bytes(missing.body))["error"]
    assert missing.status_code == 404 and body["code"] == "model_not_found" and body["param"] == "model"
    assert "Retry-After" not in missing.headers


def test_error_param_names_the_field_like_openai() -> None:
    assert error_param(("body", "messages", 0, "content", "str")) == "messages.[0].content"
    assert (
        error_param(("body", "messages", 2, "content", "list[TextPart]", 0, "type")) == "messages.[2].content"
    )
    assert error_param(("body", "tools", 0, "function", "name")) == "tools.[0].function.name"
    assert error_param(("body", "tool_choice", "literal['none','auto','required']")) == "tool_choice"
    assert error_param(("body",)) is None


def test_no_models_are_listed_before_one_is_placed() -> None:
    from shoal.types import State

    assert served_models(State(), 1) == []

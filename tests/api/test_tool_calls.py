"""Tool calls found in model output text, whole and streamed, and tools offered through chat templates."""

from __future__ import annotations

import json

import pytest

from shoal.api.tool_calls import ParsedCall, ToolCallStream, parse_tool_calls
from shoal.engine.embedded import embedded_model_path
from shoal.engine.tokenizer import TOOL_INSTRUCTIONS, load_tokenizer

WEATHER = ParsedCall("get_weather", json.dumps({"city": "Paris"}))


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',  # no closing tag at the end
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        ' {"name": "get_weather", "parameters": {"city": "Paris"}}',
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
    ],
)
def test_each_format_gives_the_call(text: str) -> None:
    assert parse_tool_calls(text) == ("", [WEATHER])


def test_text_around_calls_and_several_calls() -> None:
    text = (
        'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    content, calls = parse_tool_calls(text)
    assert content == "Let me check." and calls == [WEATHER, ParsedCall("get_time", "{}")]


@pytest.mark.parametrize(
    "text",
    [
        "Paris is sunny today.",
        "<tool_call>{not json}</tool_call>",
        '{"city": "Paris"}',  # JSON, but not a call
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',
        "[1, 2, 3]",
    ],
)
def test_anything_else_stays_content(text: str) -> None:
    assert parse_tool_calls(text) == (text, [])


def _stream(deltas: list[str]) -> tuple[str, list[ParsedCall]]:
    stream = ToolCallStream()
    shown = "".join(stream.feed(delta) for delta in deltas)
    rest, calls = stream.finish()
    return shown + rest, calls


def test_streamed_content_passes_and_calls_are_held_back() -> None:
    stream = ToolCallStream()
    assert stream.feed("Sure") == "Sure"
    assert stream.feed(" thing <tool") == " thing "  # may be the start of a marker: held
    assert stream.feed('_call>{"name": "get_weather", ') == ""
    assert stream.feed('"arguments": {"city": "Paris"}}</tool_call>') == ""
    assert stream.finish() == ("", [WEATHER])


def test_streamed_text_that_only_looked_like_a_call_is_all_shown() -> None:
    assert _stream(["a <to", "y> b"]) == ("a <toy> b", [])
    assert _stream(["{not", " a call}"]) == ("{not a call}", [])
    assert _stream(["  ", '{"name": "get_weather", "arguments": {"city": "Paris"}}']) == ("", [WEATHER])


def test_a_template_without_tools_gets_them_in_its_system_message() -> None:
    tokenizer = load_tokenizer(embedded_model_path())
    assert "tools" not in str(tokenizer.hf.chat_template)
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {}},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    text = tokenizer.decode(tokenizer.apply_chat_template(messages, [tool]), skip_special_tokens=False)
    assert TOOL_INSTRUCTIONS.splitlines()[0] in text and '"name": "get_weather"' in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<tool_response>sunny</tool_response>" in text
    plain = tokenizer.decode(tokenizer.apply_chat_template(messages[:1]), skip_special_tokens=False)
    assert "get_weather" not in plain

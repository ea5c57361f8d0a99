"""OpenAI request bodies -> GenerationRequest, on plain data: roles and content parts, tools and
tool_choice, sampling fields and their defaults, and the refusals that name their field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shoal.api.openai_models import ChatCompletionRequest, CompletionRequest
from shoal.api.openai_requests import UNTIL_CONTEXT_ENDS, chat_plan, completion_plan
from shoal.api.service import ApiProblem
from shoal.types.generation import ChatMessage, ToolCall

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def _chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "default", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_messages_become_chat_messages() -> None:
    body = _chat(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ]
    )
    assert chat_plan(body).request.prompt == (
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="a\nb"),
        ChatMessage(
            role="assistant", content="", tool_calls=(ToolCall(id="call_1", name="f", arguments="{}"),)
        ),
        ChatMessage(role="tool", content="42", tool_call_id="call_1"),
    )


def test_sampling_fields_and_defaults() -> None:
    plain = chat_plan(_chat()).request.params
    assert plain.max_tokens == UNTIL_CONTEXT_ENDS and plain.temperature == 1.0 and plain.stop == ()
    plan = chat_plan(
        _chat(
            temperature=0.3,
            top_p=0.9,
            max_tokens=50,
            max_completion_tokens=7,
            stop="END",
            seed=5,
            presence_penalty=0.5,
            top_k=20,
            min_p=0.1,
            repetition_penalty=1.1,
            ignore_eos=True,
            logprobs=True,
            top_logprobs=4,
            stream=True,
            stream_options={"include_usage": True},
            user="someone",
            metadata={"unknown": "fields are ignored"},
        )
    )
    params = plan.request.params
    assert (params.temperature, params.top_p, params.max_tokens, params.stop, params.seed) == (
        0.3,
        0.9,
        7,
        ("END",),
        5,
    )
    assert (params.top_k, params.min_p, params.repetition_penalty, params.ignore_eos) == (20, 0.1, 1.1, True)
    assert params.logprobs and params.top_logprobs == 4 and plan.stream and plan.include_usage
    assert not chat_plan(_chat(stream_options={"include_usage": True})).include_usage  # only for streams


def test_tools_are_offered_unless_tool_choice_is_none() -> None:
    plan = chat_plan(_chat(tools=[TOOL]))
    (tool,) = plan.request.tools
    assert plan.parse_tools and tool.name == "get_weather" and json.loads(tool.parameters)["type"] == "object"
    assert chat_plan(_chat(tools=[TOOL], tool_choice="auto")).parse_tools
    dropped = chat_plan(_chat(tools=[TOOL], tool_choice="none"))
    assert dropped.request.tools == () and not dropped.parse_tools


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 3}, "n"),
        ({"tools": [TOOL], "tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"logit_bias": {"1": 2.0}}, "logit_bias"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.[0].content",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x", "tool_calls": []},
                    {"role": "tool", "content": "x"},
                ]
            },
            "messages.[1].tool_call_id",
        ),
    ],
)
def test_chat_refusals_name_their_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiProblem) as refused:
        chat_plan(_chat(**fields))
    assert refused.value.status == 400 and refused.value.param == param


def _completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "default", "prompt": "Once", **fields})


def test_completion_prompts_and_logprobs() -> None:
    plan = completion_plan(_completion(logprobs=3, echo=False))
    assert plan.request.prompt == "Once" and plan.request.params.max_tokens == 16  # the legacy default
    assert plan.request.params.logprobs and plan.request.params.top_logprobs == 3 and plan.echo == ""
    assert completion_plan(_completion(prompt=["Once"])).request.prompt == "Once"
    assert completion_plan(_completion(prompt=[1, 2, 3])).request.prompt == (1, 2, 3)
    assert completion_plan(_completion(prompt=[[4, 5]])).request.prompt == (4, 5)
    assert completion_plan(_completion(echo=True)).echo == "Once"
    assert not completion_plan(_completion(logprobs=None)).request.params.logprobs


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"logprobs": 21}, "logprobs"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"n": 2}, "n"),
        ({"prompt": [1, 2], "echo": True}, "echo"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_completion_refusals_name_their_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiProblem) as refused:
        completion_plan(_completion(**fields))
    assert refused.value.status == 400 and refused.value.param == param

"""The Ollama API: its shaping on plain data (options, prompts, tool calls, the NDJSON objects), then a
live node over plain HTTP."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from shoal.api.ollama import problem_response
from shoal.api.ollama_models import (
    UNTIL_CONTEXT_ENDS,
    GenerateBody,
    Message,
    OllamaLines,
    chat_prompt,
    generate_prompt,
    merged,
    model_name,
    parameter_size,
    sampling,
)
from shoal.api.service import ApiProblem
from shoal.types.generation import ChatMessage, GenerationChunk
from tests.api.conftest import Served

# --- shaping on plain data ---------------------------------------------------------------------------


def test_options_map_to_sampling_params_over_ollama_defaults() -> None:
    defaults = sampling(None)
    assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.8, 40, 0.9)
    assert defaults.repetition_penalty == 1.1 and defaults.max_tokens == UNTIL_CONTEXT_ENDS
    given = sampling(
        {"temperature": 0, "num_predict": 7, "stop": "\n", "repeat_penalty": 1.0, "seed": 3, "num_ctx": 4096}
    )
    assert (given.temperature, given.max_tokens, given.stop, given.repetition_penalty) == (0, 7, ("\n",), 1.0)
    assert given.seed == 3
    assert sampling({"mirostat": 0, "typical_p": 1.0}).temperature == 0.8


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"temperature": -1}, "options.temperature"),
        ({"repeat_penalty": 0}, "options.repeat_penalty"),
        ({"num_predict": 0}, "options.num_predict"),
        ({"mirostat": 2}, "options.mirostat"),
        ({"no_such_option": 1}, "options.no_such_option"),
    ],
)
def test_options_that_cannot_be_honoured_are_refused_by_name(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ApiProblem) as refused:
        sampling(options)
    assert refused.value.status == 400 and refused.value.param == named
    assert named in refused.value.message


def test_prompts_from_chat_messages_and_generate_bodies() -> None:
    assert model_name("smollm2:latest") == "smollm2" and model_name("default") == "default"
    messages = [
        Message(role="user", content="Weather in Oslo?"),
        Message.model_validate(
            {
                "role": "assistant",
                "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Oslo"}}}],
            }
        ),
        Message(role="tool", content="sunny", tool_name="weather"),
    ]
    user, assistant, tool = chat_prompt(messages)
    assert user == ChatMessage(role="user", content="Weather in Oslo?")
    (call,) = assistant.tool_calls
    assert call.name == "weather" and json.loads(call.arguments) == {"city": "Oslo"} and call.id
    assert tool == ChatMessage(role="tool", content="sunny", name="weather")
    with pytest.raises(ApiProblem, match="images"):
        chat_prompt([Message(role="user", content="what is this?", images=["aGk="])])
    assert generate_prompt(GenerateBody(model="m", prompt="Once upon", raw=True)) == "Once upon"
    assert generate_prompt(GenerateBody(model="m", prompt="Hi", system="Be brief.")) == (
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Hi"),
    )
    with pytest.raises(ApiProblem, match="suffix"):
        generate_prompt(GenerateBody(model="m", prompt="def f(", suffix="return 1"))
    assert [parameter_size(n) for n in (134_515_008, 7_241_732_096, 950)] == ["134.52M", "7.24B", "950"]


def test_chat_lines_carry_content_then_tool_calls_then_the_counts() -> None:
    lines = OllamaLines("smollm2:latest", chat=True, parse_tools=True, started_ns=1_000)
    out = lines.feed(GenerationChunk(text="On it. ", token_ids=(1, 2)), now_ns=2_000)
    out += lines.feed(GenerationChunk(text='<tool_call>{"name": "weather", ', token_ids=(3,)), now_ns=3_000)
    out += lines.feed(
        GenerationChunk(
            text='"arguments": {"city": "Oslo"}}</tool_call>',
            token_ids=(4,),
            finish_reason="stop",
            prompt_tokens=40,
            completion_tokens=4,
        ),
        now_ns=6_000,
    )
    assert [line["done"] for line in out] == [False, False, True]
    assert out[0]["message"] == {"role": "assistant", "content": "On it. "}
    assert out[1]["message"]["tool_calls"] == [
        {"function": {"index": 0, "name": "weather", "arguments": {"city": "Oslo"}}}
    ]
    final = out[-1]
    assert final["done_reason"] == "stop" and final["model"] == "smollm2:latest"
    assert (final["prompt_eval_count"], final["eval_count"]) == (40, 4)
    assert (final["total_duration"], final["prompt_eval_duration"], final["eval_duration"]) == (
        5_000,
        1_000,
        4_000,
    )
    whole = merged(out)
    assert whole["done"] is True and whole["message"]["content"] == "On it. "
    assert whole["message"]["tool_calls"][0]["function"]["name"] == "weather"


def test_generate_lines_and_a_failed_task() -> None:
    lines = OllamaLines("default", chat=False)
    out = lines.feed(GenerationChunk(text="Once", token_ids=(1,)), now_ns=10)
    out += lines.feed(GenerationChunk(error="runner died"), now_ns=20)
    assert out == [
        {"model": "default", "created_at": out[0]["created_at"], "response": "Once", "done": False},
        {"error": "runner died"},
    ]
    assert lines.finished


def test_refusals_map_to_ollama_errors_with_retry_after() -> None:
    loading = problem_response(ApiProblem(503, "model_loading", "the model is loading", retry_after_s=2))
    assert loading.status_code == 503 and loading.headers["retry-after"] == "2"
    assert json.loads(loading.body) == {"error": "the model is loading"}
    assert problem_response(ApiProblem(404, "model_not_found", "nope")).status_code == 404


# --- a live node --------------------------------------------------------------------------------------

GREEDY = {"temperature": 0, "num_predict": 12}
STORY = "Write a long story about a cat."


def _post(served: Served, path: str, body: dict[str, Any]) -> httpx.Response:
    # json.dumps escapes what UTF-8 cannot carry (lone surrogates), as other clients' JSON may hold
    headers = {**served.headers, "Content-Type": "application/json"}
    return httpx.post(f"{served.url}{path}", content=json.dumps(body), headers=headers, timeout=60)


def _stream(served: Served, path: str, body: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """(arrival time, object) of every NDJSON line."""
    with httpx.stream(
        "POST", f"{served.url}{path}", json=body, headers=served.headers, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return [(time.monotonic(), json.loads(line)) for line in response.iter_lines() if line]


def _check_final(final: dict[str, Any], done_reason: str, eval_count: int) -> None:
    assert final["done"] is True and final["done_reason"] == done_reason
    assert final["eval_count"] == eval_count and final["prompt_eval_count"] > 0
    for name in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[name], int) and final[name] > 0, name
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]


def test_generate_streams_ndjson_and_equals_the_single_answer(served: Served) -> None:
    body = {"model": "default", "prompt": STORY, "options": GREEDY}
    lines = _stream(served, "/api/generate", body)
    *deltas, (ended, final) = lines
    assert len(deltas) > 1 and all(line["done"] is False for _, line in deltas)
    assert ended - deltas[0][0] > 0.02  # the first token arrives well before the generation ends
    _check_final(final, "length", 12)
    single = _post(served, "/api/generate", {**body, "stream": False}).json()
    _check_final(single, "length", 12)
    assert single["response"] == "".join(line["response"] for _, line in deltas)
    raw = _post(served, "/api/generate", {**body, "raw": True, "stream": False}).json()
    assert raw["prompt_eval_count"] < single["prompt_eval_count"]  # no chat template around it


def test_chat_streams_and_answers_with_a_tagged_model_name(served: Served) -> None:
    body = {"model": "SmolLM2-135M-Instruct:latest", "messages": [{"role": "user", "content": STORY}]}
    lines = _stream(served, "/api/chat", {**body, "options": GREEDY})
    *deltas, (_, final) = lines
    assert all(line["message"]["role"] == "assistant" for _, line in deltas)
    _check_final(final, "length", 12)
    assert final["model"] == "SmolLM2-135M-Instruct:latest"
    text = "".join(line["message"]["content"] for _, line in deltas)
    single = _post(served, "/api/chat", {**body, "options": GREEDY, "stream": False}).json()
    assert single["message"] == {"role": "assistant", "content": text}
    words = text.split()
    stop = words[1]
    cut = _post(served, "/api/chat", {**body, "options": {**GREEDY, "stop": [stop]}, "stream": False}).json()
    assert cut["done_reason"] == "stop" and cut["message"]["content"] == text[: text.index(stop)]


def test_tools_reach_the_chat_prompt(served: Served) -> None:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
        "options": {"temperature": 0, "num_predict": 1},
        "stream": False,
    }
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    bare = _post(served, "/api/chat", body).json()
    offered = _post(served, "/api/chat", {**body, "tools": [tool]}).json()
    assert offered["prompt_eval_count"] > bare["prompt_eval_count"] + 20


def test_tags_show_ps_version(served: Served) -> None:
    tags = httpx.get(f"{served.url}/api/tags", headers=served.headers, timeout=10).json()
    (entry,) = [m for m in tags["models"] if m["name"] == "SmolLM2-135M-Instruct:latest"]
    assert entry["model"] == entry["name"] and entry["size"] > 10_000_000 and len(entry["digest"]) == 64
    assert entry["details"]["format"] == "gguf" and entry["details"]["family"] == "llama"
    assert entry["details"]["parameter_size"].endswith("M")
    shown = _post(served, "/api/show", {"model": "default:latest"}).json()
    assert shown["details"] == entry["details"]
    assert shown["model_info"]["general.architecture"] == "llama"
    assert shown["model_info"]["llama.context_length"] > 0 and "completion" in shown["capabilities"]
    running = httpx.get(f"{served.url}/api/ps", headers=served.headers, timeout=10).json()
    assert [m["name"] for m in running["models"]] == ["SmolLM2-135M-Instruct:latest"]
    assert running["models"][0]["digest"] == entry["digest"] and running["models"][0]["expires_at"]
    version = httpx.get(f"{served.url}/api/version", headers=served.headers, timeout=10).json()
    assert isinstance(version["version"], str) and version["version"]
    loaded = _post(served, "/api/generate", {"model": "default"}).json()
    assert loaded["done"] is True and loaded["done_reason"] == "load"


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "nope"),
        ("/api/generate", {"model": "nope:latest", "prompt": "hi"}, 404, "nope"),
        ("/api/show", {"model": "nope"}, 404, "nope"),
        ("/api/generate", {"model": "default", "prompt": "hi", "format": "json"}, 400, "format"),
        (
            "/api/chat",
            {"model": "default", "messages": [{"role": "user", "content": "hi"}], "think": True},
            400,
            "think",
        ),
        ("/api/generate", {"model": "default", "prompt": "hi", "options": {"top_k": "many"}}, 400, "top_k"),
        ("/api/chat", {"model": "default", "messages": "hi"}, 400, "messages"),
        ("/api/generate", {"prompt": "hi"}, 400, "model"),
        ("/api/show", {"model": "a\x00b"}, 400, "NUL"),
        ("/api/generate", {"model": "default", "prompt": "hi\udad9", "raw": True}, 400, "prompt"),
    ],
)
def test_errors_in_ollama_shape(
    served: Served, path: str, body: dict[str, Any], status: int, says: str
) -> None:
    response = _post(served, path, body)
    assert response.status_code == status
    error = response.json()
    assert list(error) == ["error"] and says in error["error"]


def test_a_body_sent_as_curl_d_sends_it_is_read_as_json(served: Served) -> None:
    # `curl -d '{...}'` labels the body application/x-www-form-urlencoded; Ollama reads it as JSON anyway
    body = {"model": "default", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}
    headers = {**served.headers, "Content-Type": "application/x-www-form-urlencoded"}
    response = httpx.post(f"{served.url}/api/generate", content=json.dumps(body), headers=headers, timeout=60)
    assert response.status_code == 200 and response.json()["done"] is True

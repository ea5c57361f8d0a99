"""What every public API shares, on a live node: the API key, logprobs on the wire, /metrics, and a
client that leaves mid-stream freeing its sequence on the runner."""

from __future__ import annotations

import json
import math
import time

import httpx
import pytest

from tests.api.conftest import Served


def test_api_key_is_required_everywhere_but_health(served: Served) -> None:
    assert httpx.get(f"{served.url}/health", timeout=5).status_code == 200
    for path in ("/state", "/metrics", "/models"):
        response = httpx.get(f"{served.url}{path}", timeout=5)
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "authentication_error"
        wrong = httpx.get(f"{served.url}{path}", headers={"Authorization": "Bearer nope"}, timeout=5)
        assert wrong.status_code == 401
    assert httpx.get(f"{served.url}/state", headers=served.headers, timeout=5).status_code == 200
    anthropic_style = httpx.get(f"{served.url}/state", headers={"x-api-key": served.api_key}, timeout=5)
    assert anthropic_style.status_code == 200


def test_logprobs_travel_with_their_tokens(served: Served) -> None:
    body = {
        "model": "default",
        "prompt": "The capital of France is",
        "temperature": 0.0,
        "max_tokens": 5,
        "logprobs": True,
        "top_logprobs": 3,
    }
    response = httpx.post(f"{served.url}/generate", json=body, headers=served.headers, timeout=60)
    lines = [json.loads(line) for line in response.text.splitlines()]
    deltas = [line for line in lines if line["type"] == "delta"]
    entries = [entry for delta in deltas for entry in delta["logprobs"]]
    assert [e["token_id"] for e in entries] == [t for d in deltas for t in d["token_ids"]]
    assert "".join(e["token"] for e in entries).strip() == "".join(d["text"] for d in deltas).strip()
    for entry in entries:
        assert len(entry["top"]) == 3 and entry["logprob"] <= 0.0
        # greedy: the chosen token is the most likely one
        assert entry["top"][0]["token_id"] == entry["token_id"]
        assert math.isclose(entry["top"][0]["logprob"], entry["logprob"], abs_tol=1e-4)


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_requests_tokens_and_runners(served: Served) -> None:
    before = httpx.get(f"{served.url}/metrics", headers=served.headers, timeout=5).text
    body = {"model": "default", "prompt": "Hello", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    httpx.post(f"{served.url}/generate", json=body, headers=served.headers, timeout=60).raise_for_status()
    missing = httpx.post(
        f"{served.url}/generate", json={**body, "model": "nope"}, headers=served.headers, timeout=10
    )
    assert missing.status_code == 404
    after = httpx.get(f"{served.url}/metrics", headers=served.headers, timeout=5).text
    done = {"api": "generate", "model": "default", "outcome": "length"}
    assert (
        _metric(after, "shoal_requests_total", **done) == _metric(before, "shoal_requests_total", **done) + 1
    )
    tokens = {"api": "generate", "model": "default"}
    generated = _metric(after, "shoal_completion_tokens_total", **tokens)
    assert generated - _metric(before, "shoal_completion_tokens_total", **tokens) == 4
    assert _metric(after, "shoal_requests_total", outcome="not_found", model="nope") >= 1
    assert _metric(after, "shoal_time_to_first_token_seconds_count", **tokens) >= 1
    assert _metric(after, 'shoal_runners{state="runner_ready"}') == 1
    assert _metric(after, "shoal_nodes") == 1


def test_a_client_that_leaves_mid_stream_frees_its_sequence(served: Served) -> None:
    body = {"model": "default", "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{served.url}/generate", json=body, headers=served.headers, timeout=60
    ) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines))["type"] == "delta"
        running = httpx.get(f"{served.url}/metrics", headers=served.headers, timeout=5).text
        assert _metric(running, "shoal_runner_tasks") == 1
        assert _metric(running, "shoal_requests_in_flight", api="generate") == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(f"{served.url}/metrics", headers=served.headers, timeout=5).text
        if _metric(text, "shoal_runner_tasks") == 0 and _metric(text, "shoal_requests_in_flight") == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the sequence was not freed:\n{text}")
    assert _metric(text, "shoal_requests_total", api="generate", outcome="cancelled") >= 1


def test_the_event_feed_without_follow_ends_after_the_backlog(served: Served) -> None:
    response = httpx.get(
        f"{served.url}/events",
        params={"from_index": 1, "follow": "false"},
        headers=served.headers,
        timeout=10,
    )
    assert response.status_code == 200
    ids = [int(line[4:]) for line in response.text.splitlines() if line.startswith("id: ")]
    assert ids and ids == list(range(1, len(ids) + 1))
    assert ids[-1] <= httpx.get(f"{served.url}/health", timeout=5).json()["last_index"]


def test_a_prompt_the_runner_refuses_is_a_400_in_each_api(served: Served) -> None:
    too_long = "hello " * 20_000  # far past the context window
    openai = httpx.post(
        f"{served.url}/v1/completions",
        json={"model": "default", "prompt": too_long, "max_tokens": 2},
        headers=served.headers,
        timeout=60,
    )
    assert openai.status_code == 400 and openai.json()["error"]["type"] == "invalid_request_error"
    anthropic = httpx.post(
        f"{served.url}/v1/messages",
        json={"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": too_long}]},
        headers=served.headers,
        timeout=60,
    )
    assert anthropic.status_code == 400 and anthropic.json()["error"]["type"] == "invalid_request_error"
    ollama = httpx.post(
        f"{served.url}/api/generate",
        json={"model": "default", "prompt": too_long, "stream": False, "options": {"num_predict": 2}},
        headers=served.headers,
        timeout=60,
    )
    assert ollama.status_code == 400 and "context" in ollama.json()["error"]


def test_a_client_that_leaves_a_non_streamed_request_cancels_it(served: Served) -> None:
    body = {"model": "default", "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/completions", json=body, headers=served.headers, timeout=1.5)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = httpx.get(f"{served.url}/metrics", headers=served.headers, timeout=5).text
        if _metric(text, "shoal_runner_tasks") == 0 and _metric(text, "shoal_requests_in_flight") == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the abandoned request kept running:\n{text}")
    assert _metric(text, "shoal_requests_total", api="openai", outcome="cancelled") >= 1

"""`schemathesis` over the live node's own OpenAPI spec: no operation answers with a server error (5xx), a
status code or content type the spec does not list, or a body that breaks the spec.

Generated bodies are real requests to a node serving the embedded model, so the few fields that set how
much work a request asks for (tokens to generate) are capped, the event feed is read without following, and an instance the fuzzing places is deleted
at once; everything else is left to schemathesis. The node is offline: no download leaves the machine."""

from __future__ import annotations

import time
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.conftest import Served

MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "num_predict")
CAPPED_TOKENS = 4
EXAMPLES = 20
GENERATION_PATHS = ("/generate", "/v1/chat/completions", "/v1/completions", "/v1/messages")


def _cap(value: Any) -> Any:
    """Bodies with the token counts capped, wherever they appear (top level or Ollama's options); a
    negative `num_predict` (Ollama: until the context is full) becomes the cap too."""
    if isinstance(value, dict):
        capped = {key: _cap(item) for key, item in value.items()}
        for key in MAX_TOKENS_FIELDS:
            count = capped.get(key)
            if isinstance(count, int) and not isinstance(count, bool):
                capped[key] = (
                    CAPPED_TOKENS if key == "num_predict" and count < 0 else min(count, CAPPED_TOKENS)
                )
        return capped
    return value


def _bounded(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A generation body that would run to the end of the context (no token count) gets the cap."""
    if path in ("/api/chat", "/api/generate"):
        options = body.get("options", {})
        if isinstance(options, dict) and "num_predict" not in options:
            return {**body, "options": {**options, "num_predict": CAPPED_TOKENS}}
    elif path in GENERATION_PATHS and not any(key in body for key in MAX_TOKENS_FIELDS):
        return {**body, "max_tokens": CAPPED_TOKENS}
    return body


def test_no_server_error_and_no_answer_outside_the_spec(served: Served) -> None:
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json", headers=served.headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def check(case: Any) -> None:
            if isinstance(case.body, dict):
                case.body = _bounded(case.path, _cap(case.body))
            if case.path == "/events":
                case.query = {**(case.query or {}), "follow": "false"}  # the backlog, not an endless feed
            response = case.call_and_validate(headers=served.headers, timeout=60, checks=checks)
            if case.method == "POST" and case.path == "/instances" and response.status_code == 201:
                # a real placement: take it back at once, so the fuzzing does not fill the machine
                instance_id = response.json()["instance_id"]
                httpx.delete(f"{served.url}/instances/{instance_id}", headers=served.headers, timeout=30)

        started = time.monotonic()
        try:
            check()
        except (
            Exception,
            BaseExceptionGroup,
        ) as error:  # every operation's findings, not just the first one's
            failures.append(f"{operation.label}: {error}")
        print(f"{operation.label}: {time.monotonic() - started:.1f} s")
    assert not failures, "\n\n".join(failures)

"""Tool calls in a model's output text, in the formats the Llama-family chat templates teach:

- `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen 2/2.5/3, SmolLM3, and the
  instructions shoal adds for templates without tools); a missing closing tag at the end is tolerated;
- `[TOOL_CALLS][{...}, ...]` (Mistral);
- `<|python_tag|>{...}` or a bare JSON object/array that is the whole answer (Llama 3.1+), with
  "parameters" or "arguments".

`parse_tool_calls(text) -> (content, calls)`: all or nothing — if any candidate fails to parse, the text
stays content and there are no calls. `ToolCallStream` is the streaming form: it lets content through
as it arrives and holds back, from the first sign of a call, what `finish()` then parses.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

TAGGED = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def parse_tool_calls(text: str) -> tuple[str, list[ParsedCall]]:
    if "<tool_call>" in text:
        calls = [_call(body) for body in TAGGED.findall(text)]
        content = TAGGED.sub("", text).strip()
    elif "[TOOL_CALLS]" in text:
        head, _, tail = text.partition("[TOOL_CALLS]")
        calls, content = _calls(tail), head.strip()
    elif "<|python_tag|>" in text:
        head, _, tail = text.partition("<|python_tag|>")
        calls = [_call(part) for part in tail.split(";") if part.strip()] if tail.strip() else [None]
        content = head.strip()
    elif text.strip()[:1] in ("{", "["):
        calls, content = _calls(text), ""
    else:
        return text, []
    if not calls or any(call is None for call in calls):
        return text, []
    return content, [call for call in calls if call is not None]


def _calls(text: str) -> list[ParsedCall | None]:
    try:
        value = json.loads(text)
    except ValueError:
        return [None]
    items = value if isinstance(value, list) else [value]
    return [_from_object(item) for item in items] or [None]


def _call(text: str) -> ParsedCall | None:
    try:
        return _from_object(json.loads(text))
    except ValueError:
        return None


def _from_object(value: Any) -> ParsedCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(name=value["name"], arguments=json.dumps(arguments))


class ToolCallStream:
    """Feed text deltas; get back the part that is surely content. `finish()` parses the held rest."""

    def __init__(self) -> None:
        self._text = ""
        self._emitted = 0
        self._holding = False

    def feed(self, delta: str) -> str:
        self._text += delta
        if self._holding:
            return ""
        pending = self._text[self._emitted :]
        if self._emitted == 0:
            stripped = pending.lstrip()
            if not stripped:
                return ""  # leading whitespace: the answer may still turn out to be a bare JSON call
            if stripped[0] in "{[":
                self._holding = True
                return ""
        found = [i for i in (pending.find(marker) for marker in MARKERS) if i >= 0]
        if found:
            self._holding = True
            return self._emit(self._emitted + min(found))
        return self._emit(len(self._text) - _partial_marker_len(pending))

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """(content not yet returned, calls)."""
        rest = self._text[self._emitted :]
        self._emitted = len(self._text)
        return parse_tool_calls(rest)

    def _emit(self, end: int) -> str:
        out = self._text[self._emitted : end]
        self._emitted = end
        return out


def _partial_marker_len(text: str) -> int:
    """Length of the longest end of `text` that is the start of a marker."""
    best = 0
    for marker in MARKERS:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best

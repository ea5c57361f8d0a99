"""`shoal chat [MODEL]`: chat with a model served by a running node (through `POST /generate`).

Also the conversation loop `shoal run` opens. The history is kept and sent whole with every turn (the
runner's prefix cache makes the shared part cheap). `/bye` or Ctrl-D leaves; Ctrl-C stops the answer being
written (closing the stream cancels it on the runner) and keeps what was written so far in the history.
With stdin not a terminal, each line read is one turn.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from shoal.client import ApiError, Delta, GenerationFailed, NodeClient, NodeUnreachable
from shoal.commands.connect import add_api_options, add_sampling_options, client_for, sampling_fields
from shoal.commands.placing import PlacementFailed, find_served
from shoal.commands.progress import ProgressLine

EXIT_WORDS = frozenset({"/bye", "/exit", "/quit"})
LOAD_TIMEOUT_S = 900.0
Message = dict[str, str]


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    finish_reason: str | None  # None when interrupted
    interrupted: bool = False


def stream_answer(
    client: NodeClient,
    model: str,
    messages: list[Message],
    params: Mapping[str, Any],
    out: TextIO,
    err: TextIO,
) -> Answer:
    """Write the answer to `out` as it arrives. Ctrl-C stops it (the stream closes: cancelled on the runner)."""
    pieces: list[str] = []
    finish_reason: str | None = None
    events = client.generate(model, messages, params)
    try:
        for event in events:
            if isinstance(event, Delta):
                out.write(event.text)
                out.flush()
                pieces.append(event.text)
            else:
                finish_reason = event.finish_reason
    except KeyboardInterrupt:
        out.write("\n")
        err.write("[interrupted]\n")
        return Answer("".join(pieces), None, interrupted=True)
    finally:
        events.close()
    out.write("\n")
    out.flush()
    if finish_reason == "length":
        err.write("[stopped at --max-tokens]\n")
    return Answer("".join(pieces), finish_reason)


def _read_turn(stdin: TextIO, interactive: bool) -> str | None:
    """The next line typed, or None at end of input (Ctrl-D)."""
    if not interactive:
        line = stdin.readline()
        return line if line else None
    while True:
        try:
            return input(">>> ")
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print("\n(/bye or Ctrl-D to leave)")


def chat_loop(
    client: NodeClient,
    model: str,
    params: Mapping[str, Any],
    system: str | None,
    stdin: TextIO,
    out: TextIO,
    err: TextIO,
) -> int:
    interactive = stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        err.write(f"Chatting with {model}. /bye or Ctrl-D leaves; Ctrl-C stops an answer.\n")
    history: list[Message] = [{"role": "system", "content": system}] if system else []
    while True:
        line = _read_turn(stdin, interactive)
        if line is None:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in EXIT_WORDS:
            return 0
        turn = [*history, {"role": "user", "content": text}]
        try:
            answer = stream_answer(client, model, turn, params, out, err)
        except (ApiError, GenerationFailed) as error:
            err.write(f"error: {error}\n")
            continue  # this turn is dropped from the history; the conversation goes on
        history = [*turn, {"role": "assistant", "content": answer.text}]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a model served by a running node",
        description="Chat with MODEL on the node at --api-url (start one with `shoal run`).",
    )
    parser.add_argument("model", nargs="?", default="default", help="model name (default: the embedded one)")
    add_api_options(parser)
    add_sampling_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        try:
            client.health()
            served = find_served(client, args.model, ProgressLine(sys.stderr), LOAD_TIMEOUT_S)
        except NodeUnreachable:
            run = "shoal run" if args.model == "default" else f"shoal run {args.model}"
            print(f"shoal chat: no node answers at {args.api_url}; start one with `{run}`", file=sys.stderr)
            return 1
        except (ApiError, PlacementFailed) as error:
            print(f"shoal chat: error: {error}", file=sys.stderr)
            return 1
        if served is None:
            print(
                f"shoal chat: no instance of {args.model!r} is placed; place one with `shoal run {args.model}`",
                file=sys.stderr,
            )
            return 1
        try:
            return chat_loop(
                client, served.model, sampling_fields(args), args.system, sys.stdin, sys.stdout, sys.stderr
            )
        except NodeUnreachable as error:
            print(f"shoal chat: error: {error}", file=sys.stderr)
            return 1

"""Flags shared by the commands that talk to a node's API (`run`, `chat`, `status`): where the API is, the
API key, and the sampling settings of an answer. The edge: the environment (SHOAL_API_KEY) is read here."""

from __future__ import annotations

import argparse
import os
from typing import Any

from shoal.client import NodeClient
from shoal.commands.node import API_KEY_ENV, DEFAULT_API_PORT

DEFAULT_API_URL = f"http://127.0.0.1:{DEFAULT_API_PORT}"
# The same defaults as `shoal generate`: a small model rambles at temperature 1.
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_TOKENS = 512


def add_api_options(parser: argparse.ArgumentParser, default_url: str | None = DEFAULT_API_URL) -> None:
    parser.add_argument(
        "--api-url",
        default=default_url,
        help=f"the node's HTTP API (default: {DEFAULT_API_URL})",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"API key of a node started with --api-key (or env {API_KEY_ENV})",
    )


def api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def client_for(args: argparse.Namespace) -> NodeClient:
    return NodeClient(args.api_url, api_key(args))


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", help="system message to start the conversation with")
    parser.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 is greedy (default %(default)s)"
    )
    parser.add_argument(
        "--top-p", type=float, default=DEFAULT_TOP_P, help="nucleus mass (default %(default)s)"
    )
    parser.add_argument("--top-k", type=int, default=-1, help="sample among the k best tokens (default off)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="most tokens per answer (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def sampling_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The /generate body fields for these flags (the node checks the values and says what is wrong)."""
    fields: dict[str, Any] = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_tokens": args.max_tokens,
    }
    if args.seed is not None:
        fields["seed"] = args.seed
    return fields

"""The `shoal` command: one entry point, one module per subcommand under `shoal.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand modules, imported only when the CLI starts so `shoal --help` stays fast.
_COMMAND_MODULES = ("run", "chat", "status", "generate", "node")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole CLI; when `argv` names a subcommand, only that one's module is imported (`generate`
    imports torch, seconds that `shoal chat` or `shoal status` should not wait for)."""
    parser = argparse.ArgumentParser(
        prog="shoal", description="Turn the machines you have into one LLM cluster."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    chosen = argv[0] if argv else None
    for name in (chosen,) if chosen in _COMMAND_MODULES else _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"shoal.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"shoal.commands.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

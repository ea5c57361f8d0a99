"""The `shoal` command: one entry point, one module per subcommand under `shoal.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, imported only when the CLI starts so `shoal --help` stays fast.
_COMMAND_MODULES = ("run", "chat", "status", "generate", "node")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal", description="Turn the machines you have into one LLM cluster."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"shoal.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"shoal.commands.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""CLI subcommands: each module exposes `add_parser(subparsers)` that registers itself with a `run` handler."""

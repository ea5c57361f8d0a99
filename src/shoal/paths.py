"""`user_path(name)`: a name a user typed, as a path with `~` expanded where it can be.

`Path.expanduser` raises RuntimeError for `~someone` when that user has no home directory here. A model
name such as `~x/model` is then no path this machine has: the name stays as it is (so it does not exist,
and the caller says "unknown model") instead of the error reaching the user as a crash or an HTTP 500.
"""

from __future__ import annotations

from pathlib import Path


def user_path(name: str | Path) -> Path:
    path = Path(name)
    try:
        return path.expanduser()
    except RuntimeError:  # "Could not determine home directory."
        return path

"""The reducer's one error, in its own module so that the reducer's parts (`shoal.state`,
`shoal.instance_state`) can share it without importing each other."""

from __future__ import annotations


class InvalidEventError(ValueError):
    """An event that cannot follow the given state: the log or its sender is inconsistent."""

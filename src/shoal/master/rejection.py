"""The master's refusal of a command, shared by every family of decisions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rejection:
    """Why the master refused a command; `reason` reaches the requester as CommandRejected.reason."""

    reason: str

"""The one pydantic configuration every message and state model shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    """Immutable, strict (no silent coercion), and closed (unknown fields are an error).

    Strict mode also means sequence fields are tuples: pass `(a, b)`, not `[a, b]` (JSON arrays are fine).
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

"""Per-request sampling parameters, validated at construction. Plain data: no torch here.

Kept apart from the sampler (`sampling.py`, which needs torch) so that the bookkeeping modules
(`sequence`, `scheduler`) can hold a request's parameters without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shoal.engine.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20


# What torch.Generator.manual_seed accepts.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop. Invalid values raise InvalidRequestError naming the field.

    temperature 0 is greedy. top_k of -1 or 0 turns top-k off. Penalties follow the usual conventions:
    repetition_penalty (HF style, over prompt and output tokens) divides positive logits and multiplies
    negative ones; presence/frequency penalties (OpenAI style, over output tokens) subtract from logits.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    max_tokens: int = 256
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        # Accept lists/single strings from callers (JSON bodies, CLI) but store tuples so the object stays hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            _fail("temperature", f"must be >= 0 (0 means greedy), got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            _fail("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            _fail("top_k", f"must be -1 or 0 (off) or >= 1, got {self.top_k}")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            _fail("min_p", f"must be in [0, 1], got {self.min_p}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            _fail("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2 <= value <= 2:
                _fail(name, f"must be in [-2, 2], got {value}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not MIN_SEED <= self.seed <= MAX_SEED:
                _fail("seed", f"must fit in 64 bits ({MIN_SEED}..{MAX_SEED}), got {self.seed}")
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                _fail("stop", f"stop strings must be non-empty strings, got {stop!r}")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id)
            if token_id < 0:
                _fail("stop_token_ids", f"token ids must be >= 0, got {token_id}")
        if not isinstance(self.ignore_eos, bool):
            _fail("ignore_eos", f"must be a boolean, got {self.ignore_eos!r}")
        _check_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            _fail("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not isinstance(self.logprobs, bool):
            _fail("logprobs", f"must be a boolean, got {self.logprobs!r}")
        _check_int("top_logprobs", self.top_logprobs)
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            _fail("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            _fail("top_logprobs", "needs logprobs=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _fail(field: str, message: str) -> None:
    raise InvalidRequestError(f"{field} {message}", field=field)


def _check_number(field: str, value: object) -> None:
    # bool is an int subclass; `temperature=True` is a caller bug, not a number.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _fail(field, f"must be a finite number, got {value!r}")


def _check_int(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, f"must be an integer, got {value!r}")

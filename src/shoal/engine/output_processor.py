"""Per-request postprocessing: sampled tokens in, text deltas and finish decisions out. No torch here.

For each sampled token: stop on an end-of-sequence id (unless ignore_eos) or a stop token id, without
decoding it; else decode it incrementally and look for stop strings in the text. The text returned is cut
before a stop string and never shows any of it: while the tail of the text could still grow into a stop
string, that tail is held back. Then stop on the output-length cap. Held-back text is released when the
request finishes for another reason.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from shoal.engine.detokenizer import IncrementalDetokenizer
from shoal.engine.sampling import SampleResult
from shoal.engine.sequence import RequestStats, Sequence
from shoal.engine.tokenizer import Tokenizer

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one request: deltas since the previous output, not the whole history."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    # One entry per new token when the request asked for logprobs, else None.
    logprobs: tuple[SampleResult, ...] | None
    finished: bool
    finish_reason: str | None
    stats: RequestStats


class OutputProcessor:
    """The text side of one request. With `text=False` (an engine whose output text nobody reads: a rank
    that does not sample) tokens are decoded only when stop strings need the text; the deltas are then
    empty, and the finish decisions are the same."""

    def __init__(
        self, seq: Sequence, tokenizer: Tokenizer, eos_token_ids: Collection[int], text: bool = True
    ) -> None:
        self.seq = seq
        params = seq.params
        self._stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self._stop_token_ids.update(eos_token_ids)
        self._stops = params.stop
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self._detokenizer = (
            IncrementalDetokenizer(tokenizer, seq.prompt_token_ids) if text or self._stops else None
        )
        self._text = ""
        self._num_emitted = 0

    def process(self, result: SampleResult) -> tuple[str, str | None]:
        """Take the sampled token already appended to the sequence; return (text delta, finish reason)."""
        finish_reason: str | None = None
        if result.token_id in self._stop_token_ids:
            finish_reason = FINISH_STOP
        elif self._detokenizer is not None:
            previous_length = len(self._text)
            self._text += self._detokenizer.add(result.token_id)
            if self._stops and len(self._text) > previous_length and self._cut_at_stop(previous_length):
                finish_reason = FINISH_STOP
        if finish_reason is None and self.seq.num_output_tokens >= self.seq.max_output_tokens:
            finish_reason = FINISH_LENGTH
        end = len(self._text) if finish_reason else len(self._text) - self._held_back()
        delta = self._text[self._num_emitted : end]
        self._num_emitted = max(self._num_emitted, end)
        return delta, finish_reason

    def _cut_at_stop(self, previous_length: int) -> bool:
        """Truncate the text before the first stop string that the new text completes."""
        search_from = max(0, previous_length - self._longest_stop + 1)
        hits = [i for i in (self._text.find(s, search_from) for s in self._stops) if i >= 0]
        if not hits:
            return False
        self._text = self._text[: min(hits)]
        return True

    def _held_back(self) -> int:
        """Length of the longest text tail that is a proper prefix of some stop string."""
        for size in range(min(len(self._text), self._longest_stop - 1), 0, -1):
            tail = self._text[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0

"""Incremental detokenization: one text delta per new token, never splitting a multi-byte character.

Decoding token by token does not work: a character can span several byte-level tokens, and SentencePiece
tokenizers drop a token's leading space when it starts the decoded text. So, as vLLM and TGI do, each new
token decodes a small window [prefix_offset, end) together with the tokens before it, and the delta is what
that window adds past the already-emitted part [prefix_offset, read_offset). While the window ends in U+FFFD
(an incomplete UTF-8 sequence) nothing is emitted; the next token completes it.
"""

from __future__ import annotations

from collections.abc import Sequence

from shoal.engine.tokenizer import Tokenizer

# How many prompt tokens the first window looks back at, for the leading-space context.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._token_ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)

    def add(self, token_id: int) -> str:
        """The text this token adds; "" while it (with those before it) does not complete a character."""
        self._token_ids.append(token_id)
        new_text = self._decode(self._prefix_offset, len(self._token_ids))
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(self._prefix_text) :]
        # Keep only the window the next token needs.
        self._token_ids = self._token_ids[self._read_offset :]
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._prefix_text = self._decode(0, self._read_offset)
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._token_ids[start:end], skip_special_tokens=True)

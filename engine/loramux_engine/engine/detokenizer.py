"""Incremental detokenization and stop strings.

Decoding only a short window of recent tokens keeps each step O(1) per request;
a window that ends inside a multi-byte character yields nothing until it completes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Prompt tokens kept as left context so the first output token decodes with its
# leading space (SentencePiece drops it at the start of a decode).
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def push(self, token_ids: list[int]) -> str:
        """Add new tokens; return the text they complete."""
        self.tokens.extend(token_ids)
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix = decode(
            self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=skip
        )
        full = decode(self.tokens[self.prefix_offset :], skip_special_tokens=skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        return full[len(prefix) :]

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes as U+FFFD)."""
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix = decode(
            self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=skip
        )
        full = decode(self.tokens[self.prefix_offset :], skip_special_tokens=skip)
        self.prefix_offset = self.read_offset = len(self.tokens)
        return full[len(prefix) :]


def find_stop(text: str, num_new_chars: int, stop: Sequence[str]) -> int:
    """Index where the earliest stop string starts in ``text``, or -1.

    Only a match touching the last ``num_new_chars`` characters can be new.
    """
    best = -1
    for s in stop:
        i = text.find(s, max(0, len(text) - num_new_chars - len(s) + 1))
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best

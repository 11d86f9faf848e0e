"""Incremental detokenization with stop strings (no torch)."""

from __future__ import annotations


class Detokenizer:
    """Turns a growing list of token ids into text deltas, cutting the text before a stop string.

    A delta is only released once it is final: never half a UTF-8 character, and never text that
    could still turn out to be the start of a stop string.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._ids: list[int] = []

    def add(self, token_ids: list[int]) -> str:
        """Update with the full generated ids; return the newly final text."""
        self._ids = token_ids
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
            return ""
        return self._update(text)

    def _update(self, text: str) -> str:
        self.text = text
        found = [at for s in self.stop if (at := text.find(s, max(0, self.emitted - len(s)))) != -1]
        if found:
            self.text = text[: min(found)]
            self.stopped = True
        limit = len(self.text) if self.stopped else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : limit]
        self.emitted = limit
        return delta

    def flush(self) -> str:
        """At the end of a request, release what was held back (even an incomplete character)."""
        delta = ""
        if not self.stopped and self._ids:
            delta = self._update(self.tokenizer.decode(self._ids, skip_special_tokens=True))
        delta += self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

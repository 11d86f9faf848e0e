"""Incremental detokenization with stop strings (no torch)."""

from __future__ import annotations

# Tokens decoded before the new ones, so that tokenizers which render a token differently at the
# start of a text (SentencePiece's leading space, byte-level merges) give the right delta; the first
# new tokens are decoded after as many of the prompt's last tokens (as vLLM does).
CONTEXT_TOKENS = 5
MAX_CHAR_TOKENS = 4  # a character's UTF-8 bytes: at most 4 byte tokens


class Detokenizer:
    """Turns a growing list of token ids into text deltas, cutting the text before a stop string.

    Each step decodes only a short window (a few context tokens plus the new ones), not the whole
    output. A delta is only released once it is final: never half a UTF-8 character, and never
    text that could still turn out to be the start of a stop string.
    """

    def __init__(self, tokenizer, stop: list[str], skip_special_tokens: bool = True,
                 end_ids: frozenset[int] = frozenset(), include_stop: bool = False, min_tokens: int = 0,
                 prompt: list[int] = ()):
        """`prompt`: the ids the output follows (its last CONTEXT_TOKENS are decoded before it: without
        them a SentencePiece decoder drops the first output token's leading space, QA)."""
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.end_ids = end_ids  # a last token that ends the answer (EOS, a stop token id) is not text
        self.include_stop = include_stop  # keep the stop string (and an ending token's text) in the text
        self.min_tokens = min_tokens  # stop strings count only from this many generated tokens (vLLM's rule)
        self._generated = 0
        self._floor = 0  # the text's length before min_tokens was reached: no stop string ends before it
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # the decoded output so far (cut before a stop string once found)
        self.emitted = 0  # characters of `text` already released
        self.stopped = False
        # (a prompt ending in half a character counts its U+FFFD as its own text: the answer starts after
        # that character, as decode(prompt + answer)[len(decode(prompt)):] has it)
        self._context = list(prompt)[-(CONTEXT_TOKENS + MAX_CHAR_TOKENS - 1):]
        self._out: list[int] = []  # the output's ids (the caller's list: never copied), its first _n counted
        self._n = 0
        found = self._char_start(len(self._context) - CONTEXT_TOKENS, 0)
        start, self._before = found or (0, self._decode(self._context))  # (no character starts: all of it)
        self._context = self._context[start:]
        self._prefix = 0  # window start, in context + output: tokens already part of `text` (or the prompt's)
        self._read = len(self._context)  # tokens whose text is in `text` (or in the prompt)

    def _span(self, start: int) -> list[int]:
        """The ids from `start` on, in the context followed by the output."""
        c = len(self._context)
        return self._context[start:] + self._out[max(0, start - c): self._n]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _char_start(self, latest: int, earliest: int) -> tuple[int, str] | None:
        """The latest position from `latest` down to `earliest` where the ids start a character (their text
        does not begin with U+FFFD), with the text from there; or None. A window must start there: decoded
        from inside a character, SentencePiece's byte fallback turns the whole run of byte tokens into
        U+FFFD, valid characters after it included (QA: "日本" answered "語の本" as nine U+FFFD)."""
        for start in range(max(latest, earliest), earliest - 1, -1):
            text = self._decode(self._span(start))
            if not text.startswith("\ufffd"):
                return start, text
        return None

    def _window(self, final: bool) -> str:
        """Text of the tokens after `_read` ('' while it ends in half a character, unless final)."""
        before, after = self._before, self._decode(self._span(self._prefix))
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        read = len(self._context) + self._n  # the next window starts at most CONTEXT_TOKENS back, where a
        found = self._char_start(read - CONTEXT_TOKENS, self._prefix)  # character does
        self._prefix, self._before = found or (self._prefix, after)
        self._read = read
        return after[len(before) :]

    def add(self, token_ids: list[int]) -> str:
        """Update with the full generated ids; return the newly final text."""
        self._generated = len(token_ids)
        ends = token_ids and token_ids[-1] in self.end_ids and not self.include_stop
        self._out, self._n = token_ids, len(token_ids) - 1 if ends else len(token_ids)
        if self.stopped:
            return ""
        return self._update(self.text + self._window(final=False))

    def _update(self, text: str) -> str:
        self.text = text
        stops = self.stop if self._generated >= self.min_tokens else ()
        if not stops:
            self._floor = len(text)
        found = [(at, len(s)) for s in stops
                 if (at := text.find(s, max(0, self.emitted - len(s), self._floor - len(s) + 1))) != -1]
        if found:
            at, length = min(found)
            self.text = text[: at + length] if self.include_stop else text[:at]
            self.stopped = True
        limit = len(self.text) if self.stopped else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : limit]
        self.emitted = limit
        return delta

    def flush(self) -> str:
        """At the end of a request, release what was held back (even an incomplete character)."""
        delta = "" if self.stopped else self._update(self.text + self._window(final=True))
        delta += self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

"""Structured output: sampling constrained to a JSON schema, a regular expression, a choice of
strings or a context-free grammar, through llguidance (the library vLLM's `guidance` backend uses).

A request's `Guide` is compiled once into an llguidance grammar (cached by its text), checked
against the engine's tokenizer before the request is queued, and turned into one `LLMatcher` per
sequence. The check also runs a first step of the grammar (its first mask, one token, the next mask)
under bounded lexer work (`LIMITS`), off the engine thread: a grammar whose lexer blows up (QA: a
100-byte regex `(a{1000}){997}` cost ~1 s per sequence on the engine thread, stalling every user) is
a 400 there, and the sequences start from copies of that first step's matcher, its lexer work done;
`LIMITS` also bounds every later step. Each step, before sampling, every guided row's disallowed tokens
get `-inf`; after it, the matcher consumes the sampled token; when the grammar can go no further, the
sequence stops.
Unguided rows of the same batch are untouched.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch

from s2ft_serve.engine.request import Guide
from s2ft_serve.errors import InvalidRequestError


# llguidance's parser limits, tighter than its defaults where one mask can take long: building the regex
# ASTs (1,000,000 fuel by default took ~0.8 s on a 2-core VM for one pathological regex; 200,000 bounds
# it near 0.1 s), and the Earley items of one step (50,000 by default: an ambiguous grammar's masks grew
# to 0.8 s per token and sequence; 5,000 stops it at ~0.04 s, the sequence ending "error"); every real
# schema, choice and grammar the tests use needs far fewer
LIMITS = {"initial_lexer_fuel": 200_000, "step_max_items": 5_000}
CACHE_SIZE = 256  # compiled guides (start matchers) and refusals kept, least recently used dropped first
ERROR_CHARS = 300  # llguidance's errors dump its whole state, the grammar included: the first line, cut


def short_error(error: str) -> str:
    """llguidance's error message without its state dump, on one line, at most ERROR_CHARS characters
    (for logs and answers)."""
    line = " ".join((error or "").split("<state>")[0].split()) or "unknown error"
    return line if len(line) <= ERROR_CHARS else line[:ERROR_CHARS] + "..."


def choice_regex(choice: list[str]) -> str:
    """A regex matching exactly the strings of `choice`: each character but ASCII letters and digits
    written `\\x{hex}`. llguidance's own `choice` grammar puts every string in one Earley row, at most
    2,000 (QA: 2,001 strings were refused as a left-recursion problem); one regex lexeme takes 20,000 in
    ~0.4 s."""
    return "|".join("".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):x}}}" for c in text)
                    for text in choice)


def grammar_text(guide: Guide) -> tuple[str, str]:
    """(format, text) for `llguidance.grammar_from`: a hashable key for the compile cache."""
    if guide.json is not None:
        return "json_schema", guide.json if isinstance(guide.json, str) else json.dumps(guide.json)
    if guide.json_object:
        return "json_schema", '{"type": "object"}'
    if guide.regex is not None:
        return "regex", guide.regex
    if guide.choice is not None:
        return "choice", json.dumps(guide.choice)
    return "grammar", guide.grammar


class GuidedDecoding:
    """Compiles guides for one tokenizer and masks guided rows' logits. Built on first use: wrapping
    the tokenizer for llguidance takes ~0.3 s."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_ids: set[int]):
        import llguidance.hf

        eos = sorted(eos_ids) or None
        # n_vocab = the logits' width: ids the tokenizer lacks (padding rows of the embedding) are never allowed
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        # a first step's token is an ordinary one: llguidance's masks may allow a special token whose
        # spelling the grammar holds, which it then refuses (engine/stepper.py ends such a sequence "error")
        self.special_ids = set(eos_ids) | set(hf_tokenizer.all_special_ids) | set(
            getattr(hf_tokenizer, "added_tokens_decoder", {}))
        self.limits = llguidance.LLParserLimits(**LIMITS)
        # (format, text) -> start matcher, or the InvalidRequestError that refused it (a refusal can take as
        # long as a compile: QA, a 6,000-property schema took 15 s to fail); a key being compiled maps to an
        # Event in _compiling, so concurrent checks of one new guide compile it once
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._compiling: dict[tuple[str, str], threading.Event] = {}
        self._lock = threading.Lock()
        self._bits = 1 << torch.arange(32, dtype=torch.int32)  # bit j of each 32-token word of the bitmask

    def _compile_uncached(self, fmt: str, text: str) -> Any:
        """A matcher at the start of the grammar, its first mask computed (the sequences' matchers are
        its copies); InvalidRequestError if the grammar does not compile or fails its first step."""
        import llguidance

        what = fmt.replace("_", " ")
        try:
            grammar = (llguidance.grammar_from("regex", choice_regex(json.loads(text))) if fmt == "choice"
                       else llguidance.grammar_from(fmt, text))
        except ValueError as exc:  # not JSON, a choice that is not a list of strings, ...
            raise InvalidRequestError(f"invalid {what}: {exc}") from None
        error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if error:
            raise InvalidRequestError(f"invalid {what}: {short_error(messages[0])}")
        start = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        first = self.allowed([start])[0]
        probe = start.deep_copy()  # one step further on a copy: some lexers blow up only then
        token = next((t for t in first.nonzero().flatten().tolist() if t not in self.special_ids), None)
        if token is not None and probe.consume_token(token):
            self.allowed([probe])
        for m in (start, probe):
            if m.is_error():
                error = short_error(m.get_error())
                if error == "NoExtensionBias":  # llguidance's name for a language with no string in it (QA)
                    error = "it matches no text at all (e.g. a schema that only refers to itself)"
                raise InvalidRequestError(f"{what} cannot be served: {error}")
        return start

    def _compiled(self, key: tuple[str, str]) -> Any:
        """The cached start matcher or refusal of `key`, compiling it first if no thread does."""
        while True:
            with self._lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
                waiting = self._compiling.get(key)
                if waiting is None:
                    done = self._compiling[key] = threading.Event()
                    break
            waiting.wait()  # another thread compiles it; then it is cached (or that thread failed: retry)
        result: Any = None
        try:
            try:
                result = self._compile_uncached(*key)
            except InvalidRequestError as exc:
                result = exc
            with self._lock:
                self._cache[key] = result
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        finally:
            with self._lock:
                del self._compiling[key]
            done.set()
        return result

    def check(self, guide: Guide, param: str | None = None, compile_new: bool = True) -> Any:
        """The guide's start matcher (see `_compile_uncached`); InvalidRequestError (naming `param`) if the
        guide does not compile or fails its first step. Slow for a new guide: call it off the engine thread.
        With `compile_new=False`, None for a guide not compiled or refused before (a look-up, never slow)."""
        key = grammar_text(guide)
        if compile_new:
            result = self._compiled(key)
        else:
            with self._lock:
                result = self._cache.get(key)
        if isinstance(result, InvalidRequestError):
            raise InvalidRequestError(str(result), param=param)
        return result

    def matcher(self, guide: Guide):
        """A fresh matcher (one per sequence) at the start of the guide's grammar: a copy of the checked
        start matcher, whose first mask is computed."""
        return self.check(guide).deep_copy()

    def allowed(self, matchers: list) -> torch.Tensor:  # [len(matchers), vocab] bool, on the CPU
        """Each matcher's next allowed tokens."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.empty(len(matchers), words, dtype=torch.int32)
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), words * 4)
        bits = (bitmask[:, :, None] & self._bits).ne(0)  # [n, words, 32]; bit j of word w = token 32w + j
        return bits.view(len(matchers), -1)[:, : self.vocab_size]

    def mask(self, adjusted: torch.Tensor, raw: torch.Tensor, rows: list[int], matchers: list) -> None:
        """In `adjusted` [B, vocab], set every disallowed token of `rows` (ascending) to -inf. A row whose
        other adjustments (min_tokens) left nothing the grammar allows falls back to the raw logits."""
        allowed = self.allowed(matchers).to(adjusted.device)
        every = len(rows) == adjusted.shape[0]  # then rows are 0..B-1: no gather (a decode step of guided rows)
        idx = None if every else torch.tensor(rows, device=adjusted.device)
        masked = torch.where(allowed, adjusted if every else adjusted.index_select(0, idx), float("-inf"))
        empty = masked.amax(dim=-1) == float("-inf")
        if bool(empty.any()):
            base = raw if every else raw.index_select(0, idx)
            masked[empty] = torch.where(allowed[empty], base[empty], float("-inf"))
        if every:
            adjusted.copy_(masked)
        else:
            adjusted.index_copy_(0, idx, masked)


class LazyGuidedDecoding:
    """The engine's GuidedDecoding, built once, on first use, from any thread."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_ids: set[int]):
        self._args = (hf_tokenizer, vocab_size, eos_ids)
        self._lock = threading.Lock()
        self._built: GuidedDecoding | None = None

    @property
    def built(self) -> GuidedDecoding | None:
        """The GuidedDecoding if it was built, else None (never builds it)."""
        return self._built

    def get(self) -> GuidedDecoding:
        with self._lock:
            if self._built is None:
                try:
                    self._built = GuidedDecoding(*self._args)
                except Exception as exc:  # e.g. a slow (Python) tokenizer, which llguidance cannot read
                    raise InvalidRequestError(f"structured output is not available for this model's tokenizer: "
                                              f"{exc}") from exc
            return self._built

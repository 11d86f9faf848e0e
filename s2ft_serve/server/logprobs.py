"""Engine log-probabilities in the two OpenAI shapes: completions (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`) and chat (`content: [{token, logprob, bytes, top_logprobs}]`).

A token's `bytes` are its own bytes, so the tokens of a character split across several (an emoji,
CJK) join back into it; its string is its text, or, for such a part of a character, `\\xNN` escapes of
its bytes, as OpenAI shows them (distinct tokens stay distinct keys of `top_logprobs`).
`text_offset` counts characters of the decoded text. `top_logprobs` holds the top k and the chosen
token (so k = 0 still names the chosen one), which is what lm-evaluation-harness checks greediness
against.
"""

from __future__ import annotations

import codecs
import json
import re
from functools import lru_cache

from transformers.convert_slow_tokenizer import bytes_to_unicode

from s2ft_serve.engine.request import TokenLogprob
from s2ft_serve.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

BYTE_OF = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE's alphabet
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


def _decoder_kind(tokenizer: object) -> str | None:
    """'byte_level' (GPT-2, Llama 3, Qwen, SmolLM), 'sentencepiece' (Llama 2, Mistral) or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = (decoder.get("decoders") or []) if decoder.get("type") == "Sequence" else [decoder]
    kinds = {part.get("type") for part in parts}
    if "ByteLevel" in kinds:
        return "byte_level"
    if kinds & {"ByteFallback", "Metaspace"}:
        return "sentencepiece"
    return None


class TokenStrings:
    """Each token's bytes and shown string, for one tokenizer (cached per token)."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.kind = _decoder_kind(tokenizer)
        self.added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self._bytes: dict[int, bytes] = {}

    def bytes_of(self, token_id: int) -> bytes:
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = self._bytes[token_id] = self._raw(token_id)
        return raw

    def _raw(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)  # type: ignore[attr-defined]
        if isinstance(piece, str) and self.kind == "byte_level" and all(c in BYTE_OF for c in piece):
            return bytes(BYTE_OF[c] for c in piece)
        if isinstance(piece, str) and self.kind == "sentencepiece":
            byte = BYTE_TOKEN.fullmatch(piece)
            return bytes([int(byte[1], 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")
        return self.tokenizer.decode([token_id]).encode("utf-8")  # type: ignore[attr-defined]

    def __call__(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="backslashreplace")


@lru_cache(maxsize=4)
def token_strings(tokenizer: object) -> TokenStrings:
    """The token strings of `tokenizer` (one per engine: the tokenizer is read once)."""
    return TokenStrings(tokenizer)


class TextOffsets:
    """Character offsets of successive tokens in the text they decode to; the tokens of a character
    split across several all point at its start."""

    def __init__(self) -> None:
        self.chars = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, raw: bytes) -> int:
        at = self.chars
        pending = self._decoder.getstate()[0]
        if pending and broken(pending + raw[:1]):
            at += 1  # earlier tokens' bytes were no character: their U+FFFD comes first, and is theirs (QA)
        self.chars += len(self._decoder.decode(raw))
        return at


def broken(data: bytes) -> bool:
    """Whether `data` (held-back bytes and the next one) can no longer become UTF-8 text."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.reason != "unexpected end of data"
    return False


def _top_dict(text: TokenStrings, entry: TokenLogprob, chosen: int) -> dict[str, float]:
    top = {text(tid): lp for tid, lp in entry.top}
    top.setdefault(text(chosen), entry.logprob)
    return top


def completion_logprobs(text: TokenStrings, token_ids: list[int], entries: list[TokenLogprob | None],
                        offsets: TextOffsets | None = None) -> CompletionLogprobs:
    """Completions-format logprobs of `token_ids`; an entry of None (the first prompt token) shows as
    null. `offsets` carries the text position on from earlier tokens of the same choice."""
    out = CompletionLogprobs()
    offsets = offsets or TextOffsets()
    for token_id, entry in zip(token_ids, entries):
        out.tokens.append(text(token_id))
        out.token_logprobs.append(None if entry is None else entry.logprob)
        out.top_logprobs.append(None if entry is None else _top_dict(text, entry, token_id))
        out.text_offset.append(offsets.advance(text.bytes_of(token_id)))
    return out


def extend(target: CompletionLogprobs, more: CompletionLogprobs) -> CompletionLogprobs:
    target.tokens += more.tokens
    target.token_logprobs += more.token_logprobs
    target.top_logprobs += more.top_logprobs
    target.text_offset += more.text_offset
    return target


def _top_logprob(text: TokenStrings, token_id: int, logprob: float) -> TopLogprob:
    return TopLogprob(token=text(token_id), logprob=logprob, bytes=list(text.bytes_of(token_id)))


def chat_logprobs(text: TokenStrings, token_ids: list[int], entries: list[TokenLogprob], top_n: int) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = _top_logprob(text, token_id, entry.logprob)
        tops = [_top_logprob(text, tid, lp) for tid, lp in entry.top[:top_n]]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=tops))
    return ChatLogprobs(content=content)

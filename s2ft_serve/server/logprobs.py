"""Engine log-probabilities in the two OpenAI shapes: completions (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`) and chat (`content: [{token, logprob, bytes, top_logprobs}]`).

A token's string is its own decoding, as vLLM shows it; `top_logprobs` holds the top k and the
chosen token (so k = 0 still names the chosen one), which is what lm-evaluation-harness checks
greediness against.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

from s2ft_serve.engine.request import TokenLogprob
from s2ft_serve.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

TokenText = Callable[[int], str]


def token_text_decoder(tokenizer: object) -> TokenText:
    """A cached `token id -> string` for one request."""

    @lru_cache(maxsize=4096)
    def text(token_id: int) -> str:
        return tokenizer.decode([token_id])  # type: ignore[attr-defined]

    return text


def _top_dict(text: TokenText, entry: TokenLogprob, chosen: int) -> dict[str, float]:
    top = {text(tid): lp for tid, lp in entry.top}
    top.setdefault(text(chosen), entry.logprob)
    return top


def completion_logprobs(text: TokenText, token_ids: list[int], entries: list[TokenLogprob | None],
                        start_offset: int = 0) -> CompletionLogprobs:
    """Completions-format logprobs of `token_ids`; an entry of None (the first prompt token) shows as null."""
    out = CompletionLogprobs()
    offset = start_offset
    for token_id, entry in zip(token_ids, entries):
        token = text(token_id)
        out.tokens.append(token)
        out.token_logprobs.append(None if entry is None else entry.logprob)
        out.top_logprobs.append(None if entry is None else _top_dict(text, entry, token_id))
        out.text_offset.append(offset)
        offset += len(token)
    return out


def extend(target: CompletionLogprobs, more: CompletionLogprobs) -> CompletionLogprobs:
    target.tokens += more.tokens
    target.token_logprobs += more.token_logprobs
    target.top_logprobs += more.top_logprobs
    target.text_offset += more.text_offset
    return target


def next_offset(logprobs: CompletionLogprobs) -> int:
    if not logprobs.tokens:
        return 0
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1])


def _top_logprob(text: TokenText, token_id: int, logprob: float) -> TopLogprob:
    token = text(token_id)
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))


def chat_logprobs(text: TokenText, token_ids: list[int], entries: list[TokenLogprob], top_n: int) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = _top_logprob(text, token_id, entry.logprob)
        tops = [_top_logprob(text, tid, lp) for tid, lp in entry.top[:top_n]]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=tops))
    return ChatLogprobs(content=content)

"""Speculative decoding by prompt lookup (n-gram drafts, as vLLM's `ngram` method): no draft model.

A sequence whose last n tokens (n from `n_max` down to `n_min`) occurred earlier in its prompt or
output proposes the tokens that followed that occurrence as a draft. One forward pass then feeds each
row its last token and its draft, and the step accepts draft tokens for as long as they are what the
model chooses itself, plus the model's own next token: up to `k + 1` tokens for the price of one pass
over the weights. A greedy row accepts what greedy decoding would pick, so its output is the same as
without drafts (up to float rounding of a multi-token pass); a sampled row draws each token as it
would without a draft and keeps the draft token when the draw is that token (probability p(draft),
see `sampler.sample`), so its tokens are drawn from the model's distribution, the same ones for a seed.

Answers that copy from the prompt (extraction, editing, quoting, code) gain most; a sequence with
no match runs as usual, and a small batch pays off most, where a decode step is bound by reading the
weights rather than by arithmetic.
"""

from __future__ import annotations

import torch


def propose(tokens: torch.Tensor | list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to `k` tokens following an earlier occurrence of the longest suffix (n_max..n_min tokens) of
    `tokens` (int64 [length], or a list): the latest occurrence that `k` tokens follow, else the
    latest; [] when there is none. (In a repeating run the latest occurrence ends one token before the
    end: one token to draft.)"""
    seq = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(tokens, dtype=torch.int64)
    length = len(seq)
    if k <= 0 or length <= n_min:
        return []
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        windows = seq[: length - 1].unfold(0, n, 1)  # [length - n, n]: every n-gram that a token follows
        hits = (windows == seq[-n:]).all(dim=1).nonzero()[:, 0]
        if len(hits):
            full = hits[hits + n + k <= length]
            start = int(full[-1] if len(full) else hits[-1]) + n
            return seq[start: start + k].tolist()
    return []


def history(seq) -> torch.Tensor:
    """A sequence's tokens (prompt, then output) as int64 [length], kept in a buffer on the sequence
    that grows by doubling and takes only the tokens new since the last call: drafting reads it every
    step, and building it anew would cost O(length) each time."""
    length, buffer, filled = seq.length, seq.history, seq.history_filled
    if buffer is None or len(buffer) < length:
        grown = torch.empty(max(2 * length, 64), dtype=torch.int64)
        if buffer is not None:
            grown[:filled] = buffer[:filled]
        seq.history = buffer = grown
    if filled < length:
        prompt = len(seq.prompt_ids)
        new = (seq.prompt_ids[filled:] if filled < prompt else []) + seq.output_ids[max(filled - prompt, 0):]
        buffer[filled:length] = torch.tensor(new, dtype=torch.int64)
        seq.history_filled = length
    return buffer[:length]


def propose_reference(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Plain loops, same result as `propose`."""
    if k <= 0 or len(tokens) <= n_min:
        return []
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[-n:]
        starts = [i for i in range(len(tokens) - n) if tokens[i: i + n] == suffix]
        if starts:
            full = [i for i in starts if i + n + k <= len(tokens)]
            i = (full or starts)[-1]
            return tokens[i + n: i + n + k]
    return []

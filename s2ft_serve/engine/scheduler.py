"""Continuous-batching policy: who waits, who runs, who is admitted next (no torch here).

Running sequences own KV-cache rows `0..B-1` in order; when one finishes, the last running
sequence moves into its row (the runner copies the cache), so the batch stays contiguous.

Each step has a prefill budget of `max_tokens_per_step` prompt tokens to compute (a prefix-cache
hit's tokens are not computed). Whole prompts that fit are admitted together; a prompt needing more
than what is left is prefilled in chunks, one per step, in the spare cache row `max_batch_size`
(`chunking`), while the running batch keeps decoding; when its last chunk is done it joins the batch.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from s2ft_serve.engine.request import SamplingParams, TokenLogprob


@dataclass(eq=False)
class Sequence:
    request_id: str
    adapter_name: str | None
    prompt_ids: list[int]
    params: SamplingParams
    version: Any  # the pinned AdapterVersion, None for the base
    sink: Any  # receives StreamEvents (see engine.RequestHandle)
    detokenizer: Any
    generator: Any = None  # torch.Generator for seeded sampling
    matcher: Any = None  # llguidance.LLMatcher of a structured-output request (see engine.guided)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    row: int = -1
    prefilled: int = 0  # prompt tokens already in the cache (chunked prefill)
    hit: list = field(default_factory=list)  # prefix-cache blocks found at admission (see prefix_cache)
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    epoch: int = -1  # the registry's fusion epoch when its prefill started (see Stepper._remember)
    finish_reason: str | None = None
    cancelled: bool = False
    twin_of: Any = None  # an identical prompt admitted in the same step: its cache row is copied, not computed
    history: Any = None  # prompt + output ids as a tensor, for drafting (see speculative.history)
    history_filled: int = 0

    @property
    def length(self) -> int:  # tokens in the KV cache once the last output is fed back
        return len(self.prompt_ids) + len(self.output_ids)


class Scheduler:
    def __init__(self, max_batch_size: int, max_tokens_per_step: int, max_queue: int):
        self.max_batch_size = max_batch_size
        self.max_tokens_per_step = max_tokens_per_step
        self.max_queue = max_queue
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.chunking: Sequence | None = None  # the prompt being prefilled in chunks, in row max_batch_size
        self.chunk_twins: list[Sequence] = []  # the same prompt queued right after it: they copy its row
        self.cond = threading.Condition()

    def add_all(self, seqs: list[Sequence]) -> bool:
        """Queue sequences together (admission sees all of them or none); False, and none queued, when
        they do not all fit in the queue."""
        with self.cond:
            if len(self.waiting) + len(seqs) > self.max_queue:
                return False
            self.waiting.extend(seqs)
            self.cond.notify()
            return True

    def take_cancelled(self) -> list[Sequence]:
        """Remove cancelled waiting sequences (so they free their queue places at once)."""
        with self.cond:
            cancelled = [s for s in self.waiting if s.cancelled]
            if cancelled:
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
            return cancelled

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunking)

    def admit(self, budget: int | None = None, cost: Callable[[Sequence], int] | None = None,
              same: Callable[[Sequence, Sequence], bool] | None = None) -> list[Sequence]:
        """New sequences to prefill whole this step, within the batch size and `budget` prompt tokens
        (default `max_tokens_per_step`); `cost(seq)` is the tokens a prompt must compute (default: all of
        them; less after a prefix-cache hit). If the next prompt does not fit and no prompt is being
        chunked, it becomes `chunking` (not returned), and the sequences right after it for which
        `same(seq, chunking)` holds (the `n` choices of its request) become its `chunk_twins`: its prefill
        is theirs. Cancelled ones are returned to be finished."""
        admitted: list[Sequence] = []
        budget = self.max_tokens_per_step if budget is None else budget
        cost = cost or (lambda seq: len(seq.prompt_ids))
        with self.cond:
            while self.waiting and len(self.in_flight()) + len(admitted) < self.max_batch_size:
                seq = self.waiting[0]
                if seq.cancelled:
                    self.waiting.popleft()
                    admitted.append(seq)  # the engine finishes it without running it
                    continue
                need = cost(seq)
                if need > budget:
                    if self.chunking is None and budget > 0:
                        self.chunking = self.waiting.popleft()
                        self.chunking.row = self.max_batch_size
                        while (same is not None and self.waiting and same(self.waiting[0], self.chunking)
                               and len(self.in_flight()) + len(admitted) < self.max_batch_size):
                            self.chunk_twins.append(self.waiting.popleft())
                    break
                budget -= need
                admitted.append(self.waiting.popleft())
        return admitted

    def in_flight(self) -> list[Sequence]:
        """The sequences holding a cache row or promised one: running, the one being prefilled in chunks
        and its twins."""
        return self.running + ([self.chunking] if self.chunking is not None else []) + self.chunk_twins

    def start_running(self, seq: Sequence) -> None:
        seq.row = len(self.running)
        self.running.append(seq)

    def remove_running(self, seq: Sequence) -> Sequence | None:
        """Take `seq` out; return the sequence moved into its row (its cache must follow), if any."""
        row = seq.row
        last = self.running.pop()
        if last is seq:
            return None
        self.running[row] = last
        last.row = row
        return last

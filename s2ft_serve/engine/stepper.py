"""The engine's step loop: admit and prefill new requests, decode every running one, emit tokens."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

import torch

from s2ft_serve.engine.guided import short_error
from s2ft_serve.engine.request import StreamEvent
from s2ft_serve.engine.sampler import adjust_logits_batch, sample, token_logprobs
from s2ft_serve.engine.scheduler import Sequence
from s2ft_serve.engine.speculative import history, propose

if TYPE_CHECKING:
    from s2ft_serve.engine.engine import Engine

log = logging.getLogger(__name__)


def to_compute(seq: Sequence) -> int:
    """The prompt tokens a new sequence's prefill computes (all but a prefix-cache hit's; none for the
    twin of a prompt admitted in the same step, which copies that one's cache row)."""
    return 0 if seq.twin_of is not None else len(seq.prompt_ids) - seq.cached_tokens


def prefill_groups(seqs: list[Sequence], max_padding: float = 0.25) -> list[list[Sequence]]:
    """Split new sequences into prefill passes: by tokens to compute, a pass grows while its padding
    (to the longest) stays within `max_padding` of the tokens it computes."""
    groups: list[list[Sequence]] = []
    real = 0
    for seq in sorted(seqs, key=to_compute):
        n = to_compute(seq)  # the longest so far
        if groups and (len(groups[-1]) + 1) * n * (1 - max_padding) <= real + n:
            groups[-1].append(seq)
            real += n
        else:
            groups.append([seq])
            real = n
    return groups


class Stepper:
    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.listeners: list[Callable[[int, int], None]] = []
        self.steps = 0
        self.draft_tokens = 0  # speculative decoding: tokens proposed, and of them accepted
        self.accepted_tokens = 0
        self._next_tick = time.monotonic() + 1.0
        tok = engine.tokenizer
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen_cfg = getattr(engine.loaded.model, "generation_config", None)
        extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        eos.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
        outside = sorted(t for t in eos if not 0 <= t < engine.vocab_size)
        if outside:  # QA: one in generation_config made structured output refuse every request
            log.warning("end-of-sequence token ids %s are outside the vocabulary (%d tokens): ignored",
                        outside, engine.vocab_size)
        self.eos_ids = eos - set(outside)
        self._admitted: list[Sequence] = []  # this step's admitted sequences (see iteration)

    def iteration(self) -> bool:
        """One pass of the step loop (the engine thread runs it, between calls, once started); False
        when there was nothing to step (the thread then waits, see engine._stepping)."""
        sched = self.engine.scheduler
        if self.engine.autofuse is not None and time.monotonic() >= self._next_tick:
            self._next_tick = time.monotonic() + 1.0
            try:
                self.engine.auto_fuse_tick()
            except Exception:  # the policy's own errors are caught there; anything else must not end the thread
                log.exception("auto-fuse failed")
        if not sched.has_work():
            return False
        try:
            with self.engine.lock:
                self.step()
        except Exception:  # never let one bad step kill the engine: fail what was running
            log.exception("engine step failed; aborting the running requests")
            with self.engine.lock:
                for seq in list(sched.running):
                    self._finish(seq, "error")
                self._drop_chunking("error")
                for seq in self._admitted:  # admitted this step, not running yet (a later prefill group, a
                    if seq.finish_reason is None:  # twin): QA, they were never answered and kept their pins
                        self._release(seq)
                        self._emit_final(seq, "error")
        self._admitted = []  # (step sets it; holds no sequence between steps)
        return True

    def abort_all(self) -> None:
        """At shutdown: end every running and waiting request."""
        sched = self.engine.scheduler
        with self.engine.lock:
            for seq in list(sched.running):
                self._finish(seq, "abort")
            self._drop_chunking("abort")
            for seq in list(sched.waiting):
                self.abort_waiting(seq)
            sched.waiting.clear()

    def step(self) -> None:
        """One step: prefill what was admitted, then decode every running sequence once."""
        engine, sched = self.engine, self.engine.scheduler
        for seq in sched.take_cancelled():  # ended now, not when a place frees (QA: waited on a running request)
            self.abort_waiting(seq)
        for seq in [s for s in sched.chunk_twins if s.cancelled]:
            sched.chunk_twins.remove(seq)
            self.abort_waiting(seq)
        budget = sched.max_tokens_per_step
        if sched.chunking is not None:  # go on with the prompt being prefilled in chunks
            budget -= self._prefill_chunk(budget)
        carried = sched.chunking
        admitted = []
        seen: dict[tuple, Sequence] = {}  # the prompts admitted this step (twins: see _look_up)
        for seq in sched.admit(budget, cost=lambda seq: self._look_up(seq, seen), same=self._same_prompt):
            if seq.cancelled:
                self.abort_waiting(seq)
            else:
                admitted.append(seq)
        self._admitted = admitted  # for iteration's error path
        kept = set(admitted)
        twins: dict[Sequence, list[Sequence]] = {}  # the sequence that computes the prompt -> its twins
        for seq in admitted:
            if seq.twin_of is not None and seq.twin_of not in kept:  # that one was cancelled: compute it
                seq.twin_of, seq.cached_tokens = None, 0
            if seq.twin_of is not None:
                twins.setdefault(seq.twin_of, []).append(seq)
            budget -= to_compute(seq)
        for group in prefill_groups([seq for seq in admitted if seq.twin_of is None]):
            for seq in group:
                sched.start_running(seq)  # consecutive rows
            self._prefill(group, [twin for seq in group for twin in twins.get(seq, [])])
        chunking = sched.chunking
        if chunking is not None and chunking is not carried:  # admit() just started chunking a long prompt
            for twin in sched.chunk_twins:  # QA: each of the n choices of a long prompt was prefilled in turn
                twin.twin_of, twin.hit, twin.cached_tokens = chunking, [], chunking.cached_tokens
            chunking.prefilled = self._restore(chunking)
            if budget > 0:
                self._prefill_chunk(budget)
        for seq in [s for s in sched.running if s.cancelled]:
            self._finish(seq, "abort")
        running = list(sched.running)
        if not running:
            return
        registry = engine.registry
        drafts = self._drafts(running)
        if drafts is not None:
            self._speculate(running, drafts)
            return
        logits = engine.runner.decode(
            [s.output_ids[-1] for s in running], [s.length - 1 for s in running],
            [registry.slots_for(s.version) for s in running])
        self.steps += 1
        self._notify(len(running), len(running))
        self._accept(running, logits)

    # ---- speculative decoding (see engine.speculative) -----------------------------------
    def _drafts(self, running: list[Sequence]) -> list[list[int]] | None:
        """Each sequence's prompt-lookup draft (maybe []); None: a plain decode step
        (drafting is off, the batch is too large for it to pay, or fewer than half the sequences have a
        draft: the pass is padded to the longest draft, so every row would pay for the few)."""
        config = self.engine.config
        if not config.speculative_tokens or len(running) > config.speculative_max_batch:
            return None
        max_len = self.engine.max_model_len
        drafts = []
        for s in running:
            room = min(config.speculative_tokens, s.params.max_tokens - len(s.output_ids) - 1, max_len - s.length - 1)
            drafts.append(propose(history(s), room, config.speculative_ngram_min, config.speculative_ngram_max))
        return drafts if 2 * sum(1 for d in drafts if d) >= len(running) else None

    def _speculate(self, running: list[Sequence], drafts: list[list[int]]) -> None:
        """One pass over every row's last token and draft; each row then takes, position by position,
        the token it would have chosen anyway (greedy, or drawn as without a draft, see sampler.sample),
        for as long as that is its draft token."""
        engine = self.engine
        inputs = [[s.output_ids[-1]] + d for s, d in zip(running, drafts)]
        # each row continues its cache (rows 0..B-1) after its last token's position, like a later chunk
        # of a prompt; padding keys land past a row's last real token, where nothing reads them first
        logits = engine.runner.prefill_batch(inputs, 0, [engine.registry.slots_for(s.version) for s in running],
                                             [True] * len(running), [s.length - 1 for s in running])  # [L_i, vocab]
        self.steps += 1
        self._notify(len(running), sum(len(i) for i in inputs))
        self.draft_tokens += sum(len(d) for d in drafts)
        alive, finished = list(range(len(running))), []
        for j in range(max(len(i) for i in inputs)):  # an alive row's tokens up to j were its draft: it has j
            done = self._sample([running[i] for i in alive], torch.stack([logits[i][j] for i in alive]))
            finished += done
            ended = {seq for seq, _ in done}
            still = []
            for i in alive:  # row i's draft token j was right: position j + 1 follows from it
                seq = running[i]
                if seq not in ended and j < len(drafts[i]) and seq.output_ids[-1] == drafts[i][j]:
                    self.accepted_tokens += 1
                    still.append(i)
            alive = still
            if not alive:
                break
        for seq, reason in finished:  # after the loop: finishing moves cache rows
            self._finish(seq, reason)

    # ---- prefix cache ----------------------------------------------------------------------
    def _cache_for(self, seq: Sequence):
        """The prefix cache, if `seq` may use it: requests asking for prompt logprobs compute every
        position, so they never look."""
        return self.engine.prefix_cache if seq.params.prompt_logprobs is None else None

    def _look_up(self, seq: Sequence, seen: dict[tuple, Sequence]) -> int:
        """Admission cost of `seq`: find its cached prefix (`seq.hit`); return the tokens left to compute.
        A prompt identical to one already admitted in this step (same adapter version, same tokens, same
        prompt logprobs: the `n` choices of one request, or the same request sent several times) is its
        twin: it costs nothing, and after that one's prefill it copies its cache row and logits."""
        key = (self._owner(seq), tuple(seq.prompt_ids), seq.params.prompt_logprobs)
        twin = seen.get(key)
        if twin is not None:
            seq.twin_of, seq.hit, seq.cached_tokens = twin, [], twin.cached_tokens
            return 0
        seen[key] = seq
        cache = self._cache_for(seq)
        if cache is None:
            return len(seq.prompt_ids)
        seq.hit = cache.match(self._owner(seq), seq.prompt_ids, self.engine.registry.epoch)
        seq.cached_tokens = len(seq.hit) * cache.block_size
        return to_compute(seq)

    def _same_prompt(self, seq: Sequence, other: Sequence) -> bool:
        """Whether `seq` is `other`'s twin: the same adapter version, tokens and prompt logprobs."""
        return (self._owner(seq) == self._owner(other) and seq.prompt_ids == other.prompt_ids
                and seq.params.prompt_logprobs == other.params.prompt_logprobs)

    @staticmethod
    def _owner(seq: Sequence) -> int:
        return seq.version.uid if seq.version is not None else 0

    def _restore(self, seq: Sequence) -> int:
        """Copy `seq`'s prefix-cache hit into its row; return the tokens restored. Its prefill starts."""
        seq.epoch = self.engine.registry.epoch
        cache = self._cache_for(seq)
        if cache is None:
            return 0
        cache.record(seq.cached_tokens, len(seq.prompt_ids))
        restored, seq.hit = cache.restore(seq.hit, seq.row), []
        return restored

    def _remember(self, seq: Sequence) -> None:
        """Offer `seq`'s prompt (all of it in its row now) to the prefix cache, unless its adapter version
        has retired meanwhile (no later request can match it; its blocks were dropped) or something was
        fused or unfused since its prefill started (QA: a prompt prefilled in chunks across a fuse brought
        the old weights' keys and values back into the emptied cache)."""
        epoch = self.engine.registry.epoch
        if (self.engine.prefix_cache is not None and not (seq.version is not None and seq.version.retired)
                and seq.epoch == epoch):
            self.engine.prefix_cache.insert(self._owner(seq), seq.prompt_ids, seq.row, epoch)

    # ---- prefill -------------------------------------------------------------------------
    def _prefill(self, seqs: list[Sequence], twins: list[Sequence] = ()) -> None:
        """Prefill `seqs` (in consecutive rows) in one pass, each after its prefix-cache hit if any; give
        each of `twins` (identical prompts, see `_look_up`) a running row and a copy of its twin's
        cache row and prompt logprobs; sample every first token."""
        engine = self.engine
        offsets = [self._restore(s) for s in seqs]
        want = [s.params.prompt_logprobs is not None for s in seqs]  # these never hit: offset 0
        logits = engine.runner.prefill_batch([s.prompt_ids[o:] for s, o in zip(seqs, offsets)], seqs[0].row,
                                             [engine.registry.slots_for(s.version) for s in seqs], want, offsets)
        self._notify(len(seqs), sum(len(s.prompt_ids) - o for s, o in zip(seqs, offsets)))
        last = {}
        for seq, lg, w in zip(seqs, logits, want):
            self._remember(seq)
            if w:
                self._add_prompt_logprobs(seq, lg, 0)
            last[seq] = lg[-1]
        for twin in twins:  # before any first token: a sequence that finishes at once gives up its row
            source, twin.twin_of = twin.twin_of, None
            engine.scheduler.start_running(twin)
            engine.runner.move_row(source.row, twin.row, len(source.prompt_ids))
            if source.prompt_logprobs is not None:
                twin.prompt_logprobs = list(source.prompt_logprobs)
            last[twin] = last[source]
        ordered = list(seqs) + list(twins)
        self._first_tokens(ordered, [last[s] for s in ordered])

    def _prefill_chunk(self, budget: int) -> int:
        """Prefill the next chunk (at most `budget` tokens) of the chunked prompt; return its size.
        After its last chunk the sequence joins the running batch and samples its first token."""
        engine, sched = self.engine, self.engine.scheduler
        seq = sched.chunking
        if seq.cancelled:
            self._drop_chunking("abort", requeue_twins=True)
            return 0
        start, prompt = seq.prefilled, seq.prompt_ids
        n = min(budget, len(prompt) - start)
        want_lp = seq.params.prompt_logprobs is not None
        logits = engine.runner.prefill_batch([prompt[start: start + n]], seq.row,
                                             [engine.registry.slots_for(seq.version)], [want_lp], [start])[0]
        seq.prefilled += n
        self._notify(1, n)
        if want_lp:
            self._add_prompt_logprobs(seq, logits, start)
        if seq.prefilled == len(prompt):
            self._remember(seq)
            twins, sched.chunking, sched.chunk_twins = sched.chunk_twins, None, []
            chunk_row = seq.row
            sched.start_running(seq)
            engine.runner.move_row(chunk_row, seq.row, len(prompt))
            for twin in twins:  # before any first token: a sequence that finishes at once gives up its row
                twin.twin_of = None
                sched.start_running(twin)
                engine.runner.move_row(seq.row, twin.row, len(prompt))
                if seq.prompt_logprobs is not None:
                    twin.prompt_logprobs = list(seq.prompt_logprobs)
            self._first_tokens([seq, *twins], [logits[-1]] * (1 + len(twins)))
        return n

    @staticmethod
    def _add_prompt_logprobs(seq: Sequence, logits: torch.Tensor, start: int) -> None:
        """Append the logprobs of the prompt tokens that positions `start, start + 1, ...` predict."""
        targets = seq.prompt_ids[start + 1: start + len(logits) + 1]  # none after the prompt's last token
        lps = token_logprobs(logits[: len(targets)], targets, seq.params.prompt_logprobs)
        seq.prompt_logprobs = (seq.prompt_logprobs or [None]) + lps

    def _first_tokens(self, seqs: list[Sequence], last_logits: list[torch.Tensor]) -> None:
        """After their prompts: finish the `max_tokens=0` sequences, sample the others' first token."""
        sampled = []
        for seq, logits in zip(seqs, last_logits):
            if seq.params.max_tokens == 0:
                self._finish(seq, "length")
            else:
                sampled.append((seq, logits))
        if sampled:
            self._accept([s for s, _ in sampled], torch.stack([lg for _, lg in sampled]))

    def _notify(self, batch: int, tokens: int) -> None:
        """Tell the step listeners of a forward pass. A listener that raises is logged, never the step's
        undoing (QA: one raising listener ended every running request with "error")."""
        for fn in self.listeners:
            try:
                fn(batch, tokens)
            except Exception:
                log.exception("step listener %r failed", fn)

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per sequence from logits [B, vocab]; emit; finish those that are done."""
        for seq, reason in self._sample(seqs, logits):
            self._finish(seq, reason)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, str]]:
        """Sample one token per sequence from logits [B, vocab] and emit it; return the sequences that
        are done, with why (the caller finishes them)."""
        adjusted = logits
        guided = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if any(s.params.adjusts_logits for s in seqs):  # these change what is sampled, not logprobs
            adjusted = adjust_logits_batch(logits, [s.params for s in seqs], [s.prompt_ids for s in seqs],
                                           [s.output_ids for s in seqs], self.eos_ids)  # a new tensor
        elif guided:
            adjusted = logits.clone()  # masked in place below; the logprobs stay the model's own
        if guided:
            self.engine.guided.mask(adjusted, logits, guided, [seqs[i].matcher for i in guided])
        chosen = sample(adjusted, [s.params for s in seqs], [s.generator for s in seqs])
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None and chosen[i] is not None]
        lps = {}
        if want:
            top = max(seqs[i].params.logprobs for i in want)
            for i, lp in zip(want, token_logprobs(logits[want], [chosen[i] for i in want], top)):
                lp.top = lp.top[: seqs[i].params.logprobs]
                lps[i] = lp
        done = []
        for i, (seq, token) in enumerate(zip(seqs, chosen)):
            if token is None:  # its logits gave nothing to sample from: this request ends, the rest go on
                log.error("request %s: no distribution to sample from (NaN logits, or every token at -inf)",
                          seq.request_id)
                done.append((seq, "error"))
                continue
            seq.output_ids.append(token)
            if seq.matcher is not None and not seq.matcher.consume_token(token):
                log.error("structured output of %s refused token %d: %s", seq.request_id, token,
                          short_error(seq.matcher.get_error()))  # not llguidance's whole state dump
            if i in lps:
                seq.logprobs.append(lps[i])
            delta = seq.detokenizer.add(seq.output_ids)
            reason = self._finish_reason(seq, token)
            if reason:  # the text held back (half a character, a stop string's possible start) is this token's:
                delta += seq.detokenizer.flush()  # the final event then carries none, so one chunk per token
            seq.sink.put(StreamEvent(seq.request_id, token, delta, lps.get(i)))
            if reason:
                done.append((seq, reason))
        return done

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.detokenizer.stopped:
            return "stop"
        if token in seq.detokenizer.end_ids:  # SamplingParams.end_ids, worked out once per request
            return "stop"
        if seq.matcher is not None and seq.matcher.is_error():
            return "error"  # the mask let through a token the grammar then refused (one spelling a special
            # token): the text no longer matches the guide, so it must not end as a success
        if seq.matcher is not None and seq.matcher.is_stopped():
            return "stop"  # the grammar is complete: nothing more may follow
        if len(seq.output_ids) >= p.max_tokens or seq.length >= self.engine.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        sched, runner = self.engine.scheduler, self.engine.runner
        moved = sched.remove_running(seq)
        if moved is not None:
            runner.move_row(len(sched.running), moved.row, moved.length)
        self._release(seq)
        self._emit_final(seq, reason)

    def _drop_chunking(self, reason: str, requeue_twins: bool = False) -> None:
        """End the chunked prompt's sequence with `reason`, and its twins too, unless `requeue_twins`
        (its own request was cancelled): they go back to the head of the queue to compute it themselves."""
        sched = self.engine.scheduler
        seq, sched.chunking = sched.chunking, None
        twins, sched.chunk_twins = sched.chunk_twins, []
        if seq is not None:
            self._release(seq)
            self._emit_final(seq, reason)
        for twin in twins:
            twin.twin_of, twin.cached_tokens = None, 0
        if requeue_twins:
            with sched.cond:
                sched.waiting.extendleft(reversed(twins))
        else:
            for twin in twins:
                self._release(twin)
                self._emit_final(twin, reason)

    def abort_waiting(self, seq: Sequence) -> None:
        """End a sequence that never ran (cancelled while waiting, or at shutdown)."""
        self._release(seq)
        self._emit_final(seq, "abort")

    def _release(self, seq: Sequence) -> None:
        if seq.version is not None:
            self.engine.registry.release(seq.version)
            seq.version = None

    def _emit_final(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.sink.put(StreamEvent(seq.request_id, None, seq.detokenizer.flush(), finished=True, finish_reason=reason))

"""Identical prompts admitted together (the n choices of one request, the same request sent twice)
are prefilled once: the others copy that cache row and logits, and each still gets exactly what it
gets alone."""

from __future__ import annotations

import threading

import pytest

from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.errors import InvalidRequestError, QueueFullError
from s2ft_serve.model.testing import random_adapter

from engine_reference import make_engine, reference, reference_greedy

PROMPT = list(range(40, 75))  # 35 tokens: two 16-token blocks and a tail
OTHER = list(range(100, 121))


def queued_then_run(engine, jobs):
    """Submit every (prompt, adapter, params) before the engine starts, so they are admitted in one step;
    return the outputs and the prompt tokens each forward pass computed (`(rows, tokens)` per pass)."""
    passes = []
    engine.add_step_listener(lambda rows, tokens: passes.append((rows, tokens)))
    handles = [engine.submit(prompt, adapter, params) for prompt, adapter, params in jobs]
    engine.start()
    return [h.result() for h in handles], passes


def test_identical_prompts_are_computed_once_and_answer_as_alone(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, max_batch_size=8)
    try:
        adapter = random_adapter(engine.loaded.model, engine.model_name, seed=4, channels=4)
        engine.add_adapter("a", adapter)
        greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        jobs = [(PROMPT, None, greedy), (PROMPT, None, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)),
                (PROMPT, None, greedy), (PROMPT, "a", greedy), (OTHER, None, greedy), (PROMPT, "a", greedy)]
        outs, passes = queued_then_run(engine, jobs)
        # one prefill pass: the base's prompt, the adapter's (its own weights: not a twin) and the other prompt
        assert passes[0] == (3, 2 * len(PROMPT) + len(OTHER))
        base = reference_greedy(reference(tiny_llama_dir), PROMPT, 5)
        adapted = reference_greedy(reference(tiny_llama_dir, (adapter, 1.0)), PROMPT, 5)
        assert [o.token_ids for o in outs] == [base, base[:1], base, adapted,
                                               reference_greedy(reference(tiny_llama_dir), OTHER, 5), adapted]
    finally:
        engine.shutdown(timeout=5)


def test_sampled_twins_draw_their_own_tokens_and_prompt_logprobs_are_shared(tiny_llama_dir):
    """Seeded twins give what each seed gives alone (one of them ends at its first token, which must not
    disturb the others' copied rows); twins asking for prompt logprobs get the same ones as alone."""
    alone_engine = make_engine(tiny_llama_dir, max_batch_size=8).start()
    try:
        params = [SamplingParams(max_tokens=6, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3)]
        params.insert(1, SamplingParams(max_tokens=1, temperature=1.0, seed=9, ignore_eos=True))
        scored = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2, ignore_eos=True)
        alone = [alone_engine.generate(PROMPT, None, p) for p in params + [scored]]
    finally:
        alone_engine.shutdown(timeout=5)
    engine = make_engine(tiny_llama_dir, max_batch_size=8)
    try:
        outs, passes = queued_then_run(engine, [(PROMPT, None, p) for p in params + [scored, scored]])
        assert passes[0] == (2, 2 * len(PROMPT))  # the sampled prompt once, the scored one once
        assert [o.token_ids for o in outs[:4]] == [a.token_ids for a in alone[:4]]
        assert len({tuple(o.token_ids) for o in outs[:4]}) > 1  # different seeds, different answers
        for twin in outs[4:]:
            assert twin.token_ids == alone[4].token_ids
            assert [(lp.token_id, round(lp.logprob, 5)) for lp in twin.prompt_logprobs[1:]] == \
                [(lp.token_id, round(lp.logprob, 5)) for lp in alone[4].prompt_logprobs[1:]]
            assert len(twin.prompt_logprobs) == len(PROMPT)
    finally:
        engine.shutdown(timeout=5)


def test_a_twin_of_a_cancelled_prompt_computes_its_own(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, max_batch_size=8)
    try:
        greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        first = engine.submit(PROMPT, None, greedy)
        second = engine.submit(PROMPT, None, greedy)
        look_up, costed = engine.stepper._look_up, []

        def cancel_after_costing(seq, seen):  # `first` is cancelled once `second` was made its twin
            cost = look_up(seq, seen)
            costed.append(seq)
            if len(costed) == 2:
                first.cancel()
            return cost

        engine.stepper._look_up = cancel_after_costing
        engine.start()
        assert first.result().finish_reason == "abort"
        out = second.result()
        assert out.token_ids == reference_greedy(reference(tiny_llama_dir), PROMPT, 4)
        assert out.finish_reason == "length"
    finally:
        engine.shutdown(timeout=5)




def test_submit_many_queues_all_or_none(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, max_queue=3)
    try:
        engine.add_adapter("a", random_adapter(engine.loaded.model, engine.model_name, seed=5, channels=4))
        greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        first = engine.submit(PROMPT, "a", greedy)
        with pytest.raises(QueueFullError):
            engine.submit_many([(PROMPT, "a", greedy)] * 3)  # 1 + 3 waiting > 3
        with pytest.raises(InvalidRequestError):
            engine.submit_many([(PROMPT, "a", greedy), (PROMPT, "a", SamplingParams(max_tokens=-1))])
        assert len(engine.scheduler.waiting) == 1 and engine.registry.get("a").version.refs == 1  # nothing kept
        handles = [first] + engine.submit_many([(PROMPT, "a", greedy)] * 2)
        engine.start()
        outs = [h.result() for h in handles]
        assert len(outs) == 3 and len({tuple(o.token_ids) for o in outs}) == 1
        assert engine.registry.get("a").version.refs == 0
    finally:
        engine.shutdown(timeout=5)


@pytest.mark.parametrize("prefix_cache_bytes, prompt_logprobs", [(0, None), (0, 1), (2**20, 1)])
def test_the_choices_of_a_prompt_prefilled_in_chunks_share_its_prefill(tiny_llama_dir, prefix_cache_bytes,
                                                                       prompt_logprobs):
    """QA: the `n` choices of a prompt longer than the step's budget were chunked one after another, each
    computing the whole prompt (n times the work; the prefix cache hid it only without prompt logprobs)."""
    engine = make_engine(tiny_llama_dir, max_batch_size=8, max_tokens_per_step=8,
                         prefix_cache_bytes=prefix_cache_bytes)
    try:
        params = [SamplingParams(max_tokens=4, temperature=1.0, seed=s, ignore_eos=True,
                                 prompt_logprobs=prompt_logprobs) for s in (1, 2, 3)]
        params.append(SamplingParams(max_tokens=1, temperature=1.0, seed=9, ignore_eos=True,
                                     prompt_logprobs=prompt_logprobs))
        passes = []
        engine.add_step_listener(lambda rows, tokens: passes.append((rows, tokens)))
        handles = engine.submit_many([(PROMPT, None, p) for p in params] + [(OTHER, None, params[0])])
        engine.start()
        outs = [h.result() for h in handles]
        assert sum(tokens for rows, tokens in passes if tokens > rows) <= len(PROMPT) + len(OTHER)  # each once
    finally:
        engine.shutdown(timeout=5)
    with make_engine(tiny_llama_dir, max_batch_size=8) as alone:
        for out, (prompt, p) in zip(outs, [(PROMPT, p) for p in params] + [(OTHER, params[0])]):
            expected = alone.generate(prompt, None, p)
            assert out.token_ids == expected.token_ids
            if prompt_logprobs is not None:
                assert [(lp.token_id, round(lp.logprob, 5)) for lp in out.prompt_logprobs[1:]] == \
                    [(lp.token_id, round(lp.logprob, 5)) for lp in expected.prompt_logprobs[1:]]


def test_twins_of_a_chunked_prompt_outlive_its_cancel_and_end_at_their_own(tiny_llama_dir):
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    expected = reference_greedy(reference(tiny_llama_dir), PROMPT, 4)
    with make_engine(tiny_llama_dir, max_batch_size=8, max_tokens_per_step=8) as engine:
        first_chunk, go_on = threading.Event(), threading.Event()

        def hold_after_the_first_chunk(rows, tokens):  # (a step listener runs on the engine thread)
            if not first_chunk.is_set():
                first_chunk.set()
                go_on.wait(30)

        engine.add_step_listener(hold_after_the_first_chunk)
        first, second, third = engine.submit_many([(PROMPT, None, greedy)] * 3)
        assert first_chunk.wait(30)  # the prompt is being chunked, the other two waiting on it
        first.cancel()
        third.cancel()
        go_on.set()
        assert first.result().finish_reason == "abort" and third.result().finish_reason == "abort"
        out = second.result()  # back in the queue when its prompt's request left: it computes it itself
        assert out.token_ids == expected and out.finish_reason == "length"
        assert engine.stats().running == 0 and engine.stats().waiting == 0

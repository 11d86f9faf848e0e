"""Prompt-lookup speculative decoding: drafts found as in the plain reference; an engine that drafts
answers greedy requests exactly as one that does not (tokens, text, finish reasons, logprobs),
whatever the adapters, stops, logit rules and structured output in the batch; a sampled row that
drafts still draws from the model's distribution."""

from __future__ import annotations

import random

import pytest
from engine_reference import make_engine

from s2ft_serve.engine.request import Guide, SamplingParams
from s2ft_serve.engine.speculative import propose, propose_reference
from s2ft_serve.model.testing import random_adapter

PROMPTS = ["hello hello hello hello", "abc abc abc abc abc", "the cat sat on the mat; the cat", "xyz"]


def test_propose_by_hand():
    assert propose([1, 2, 3, 9, 1, 2, 3], k=3, n_min=1, n_max=3) == [9, 1, 2]
    assert propose([1, 2, 3, 9, 1, 2, 3], k=1, n_min=1, n_max=3) == [9]
    # the latest occurrence of the longest suffix wins: [2, 3] -> 7 (latest), not -> 9
    assert propose([2, 3, 9, 2, 3, 7, 5, 2, 3], k=2, n_min=1, n_max=2) == [7, 5]
    assert propose([4, 5, 6], k=3, n_min=1, n_max=3) == []  # nothing repeats
    assert propose([4, 5, 4], k=3, n_min=2, n_max=3) == []  # only a 1-gram repeats
    assert propose([4, 5, 4], k=3, n_min=1, n_max=3) == [5, 4]
    assert propose([7, 7], k=0, n_min=1, n_max=2) == []
    # a repeating run: the latest occurrence that k tokens follow, not the one just before the end
    assert propose([7, 7, 7, 7, 7, 7], k=3, n_min=1, n_max=2) == [7, 7, 7]
    assert propose([1, 2, 1, 2, 1, 2], k=3, n_min=1, n_max=2) == [1, 2, 1]


def test_propose_equals_reference_on_random_sequences():
    rng = random.Random(0)
    for _ in range(500):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        k, n_min = rng.randrange(0, 6), rng.randrange(1, 4)
        n_max = rng.randrange(n_min, 6)
        assert propose(tokens, k, n_min, n_max) == propose_reference(tokens, k, n_min, n_max), (tokens, k, n_min, n_max)


@pytest.fixture
def pair(tiny_model_dir):
    """Two engines on the same model and adapters: one drafting (k=4), one not."""
    engines = []
    for k in (0, 4):
        e = make_engine(tiny_model_dir, max_batch_size=8, speculative_tokens=k).start()
        for i in range(2):
            e.add_adapter(f"a{i}", random_adapter(e.loaded.model, e.model_name, seed=10 + i, channels=6))
        engines.append(e)
    yield engines
    for e in engines:
        e.shutdown(timeout=5)


def run_all(engine, requests):
    handles = [engine.submit(prompt, adapter, params) for prompt, adapter, params in requests]
    return [h.result() for h in handles]


def same(a, b):
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.text for o in a] == [o.text for o in b]
    assert [o.finish_reason for o in a] == [o.finish_reason for o in b]


def test_greedy_answers_are_unchanged_and_drafts_are_used(pair):
    plain, drafting = pair
    greedy = SamplingParams(max_tokens=40, temperature=0)
    requests = [(p, a, greedy) for p in PROMPTS for a in (None, "a0", "a1")]
    same(run_all(plain, requests), run_all(drafting, requests))  # in one mixed batch
    for request in requests[:4]:  # and alone
        same(run_all(plain, [request]), run_all(drafting, [request]))
    stats = drafting.stats()
    assert 0 < stats.spec_accepted_tokens <= stats.spec_draft_tokens
    assert stats.steps < plain.stats().steps
    assert plain.stats().spec_draft_tokens == 0


def test_seeded_sampled_answers_are_the_same_with_drafting_or_without(pair):
    """One draw per token, a draft token kept when the draw is that token: a seeded request draws the
    same tokens whichever steps drafted for it (which depends on the batch at each step)."""
    plain, drafting = pair
    requests = [(PROMPTS[0], "a0", SamplingParams(max_tokens=30, temperature=0)),
                (PROMPTS[1], "a1", SamplingParams(max_tokens=30, temperature=0.3, seed=5)),
                (PROMPTS[2], None, SamplingParams(max_tokens=30, temperature=0.3, top_k=20, seed=6))]
    before = drafting.stats()
    first, second = run_all(drafting, requests), run_all(drafting, requests)
    same(first, second)  # seeded: the same answers again
    same(first, run_all(plain, requests))  # and those of plain decoding
    for request in requests[1:]:  # alone, where other steps draft
        same(run_all(drafting, [request]), run_all(plain, [request]))
    after = drafting.stats()
    assert after.spec_draft_tokens > before.spec_draft_tokens
    assert after.spec_accepted_tokens > before.spec_accepted_tokens


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),  # max_tokens inside a draft
    SamplingParams(max_tokens=40, temperature=0, stop=["lo h", "c a"]),  # a stop string inside a draft
    SamplingParams(max_tokens=40, temperature=0, repetition_penalty=1.3, logit_bias={5: 3.0}),
    SamplingParams(max_tokens=40, temperature=0, min_tokens=12),
])
def test_stops_and_logit_rules_inside_drafts(pair, params):
    plain, drafting = pair
    requests = [(p, "a0", params) for p in PROMPTS]
    same(run_all(plain, requests), run_all(drafting, requests))


def test_a_request_ending_inside_a_draft_leaves_the_others_caches_whole(pair):
    """Ending a request moves the last row's cache into its row: only after every row took its tokens,
    or the moved row would lose the keys of the drafts it accepts later in the same step."""
    plain, drafting = pair
    # a forced token makes every draft full and accepted; the model's own logprobs show a lost key
    forced = dict(temperature=0, ignore_eos=True, logit_bias={5: 100.0}, logprobs=0)
    for short in range(2, 16):
        requests = [(PROMPTS[3], None, SamplingParams(max_tokens=short, **forced)),
                    (PROMPTS[3], "a0", SamplingParams(max_tokens=20, **forced)),
                    (PROMPTS[3], "a1", SamplingParams(max_tokens=20, **forced))]
        a, b = run_all(plain, requests), run_all(drafting, requests)
        same(a, b)
        for x, y in zip(a, b):
            assert [lp.logprob for lp in x.logprobs] == pytest.approx([lp.logprob for lp in y.logprobs], abs=1e-4)


def test_logprobs_equal_those_of_plain_decoding(pair):
    plain, drafting = pair
    params = SamplingParams(max_tokens=30, temperature=0, logprobs=3)
    requests = [(p, "a1", params) for p in PROMPTS[:2]]
    a, b = run_all(plain, requests), run_all(drafting, requests)
    same(a, b)
    for x, y in zip(a, b):
        for lx, ly in zip(x.logprobs, y.logprobs):
            assert lx.token_id == ly.token_id and lx.logprob == pytest.approx(ly.logprob, abs=1e-4)
            assert [t for t, _ in lx.top] == [t for t, _ in ly.top]


def test_structured_output_with_drafts(pair):
    plain, drafting = pair
    params = SamplingParams(max_tokens=40, temperature=0, guide=Guide(regex="(ab|cd)(ab|cd)(ab|cd)+!"))
    requests = [(p, "a0", params) for p in PROMPTS[:2]]
    same(run_all(plain, requests), run_all(drafting, requests))


def test_no_drafts_beyond_the_batch_limit(tiny_model_dir):
    e = make_engine(tiny_model_dir, max_batch_size=8, speculative_tokens=4, speculative_max_batch=2)
    try:
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        handles = [e.submit(PROMPTS[0], None, params) for _ in range(4)]  # queued before the engine steps:
        e.start()  # the four run together from the first step to the last
        [h.result() for h in handles]
        assert e.stats().spec_draft_tokens == 0
        run_all(e, [(PROMPTS[0], None, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))])
        assert e.stats().spec_draft_tokens > 0
    finally:
        e.shutdown(timeout=5)


def test_bad_ngram_range_is_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="speculative_ngram_min"):
        make_engine(tiny_llama_dir, speculative_tokens=4, speculative_ngram_min=3, speculative_ngram_max=2)


def test_history_is_the_sequence_as_it_grows():
    """The drafting buffer equals prompt + output after every step, however many tokens a step added."""
    from types import SimpleNamespace

    from s2ft_serve.engine.speculative import history

    seq = SimpleNamespace(prompt_ids=list(range(40)), output_ids=[], history=None, history_filled=0)
    seq.length = len(seq.prompt_ids)
    for added in [0, 1, 3, 1, 30, 2, 100, 1]:  # speculative steps add several tokens at once
        seq.output_ids += [1000 + len(seq.output_ids) + i for i in range(added)]
        seq.length = len(seq.prompt_ids) + len(seq.output_ids)
        assert history(seq).tolist() == seq.prompt_ids + seq.output_ids
    assert propose(history(seq), 3, 1, 2) == propose(seq.prompt_ids + seq.output_ids, 3, 1, 2)

"""Penalties, logit bias and min_tokens: what they do to one row of logits, and end to end in the
engine against a transformers reference loop that applies the same rules written out plainly."""

from __future__ import annotations

import math

import pytest
import torch
from engine_reference import reference, reference_logits

from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.engine.sampler import adjust_logits_batch, adjust_logits_reference, sample
from s2ft_serve.errors import InvalidRequestError

ROW = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0, 2.0])


def adjusted(prompt=(), output=(), eos=frozenset(), **params) -> list[float]:
    params = SamplingParams(max_tokens=10, **params)
    return adjust_logits_reference(ROW, params, list(prompt), list(output), set(eos)).tolist()


def test_each_rule_by_hand():
    assert adjusted() == ROW.tolist()
    assert adjusted(logit_bias={0: 2.5, 4: -100}) == [3.5, -2.0, 3.0, 0.5, -101.0, 2.0]
    # frequency per occurrence, presence once, generated tokens only (the prompt's 5 is not counted)
    assert adjusted(prompt=[5], output=[2, 2, 1], frequency_penalty=0.5, presence_penalty=0.25) == pytest.approx(
        [1.0, -2.75, 1.75, 0.5, -1.0, 2.0])
    # repetition: prompt and output tokens, positive divided, negative multiplied
    assert adjusted(prompt=[0, 1], output=[5], repetition_penalty=2.0) == [0.5, -4.0, 3.0, 0.5, -1.0, 1.0]
    # min_tokens bans EOS and stop ids until enough tokens exist; ignore_eos keeps EOS allowed
    assert adjusted(output=[3], eos={2}, min_tokens=2, stop_token_ids=[4]) == [1.0, -2.0, -math.inf, 0.5, -math.inf,
                                                                               2.0]
    assert adjusted(output=[3], eos={2}, min_tokens=2, ignore_eos=True, stop_token_ids=[4])[2] == 3.0
    assert adjusted(output=[3, 1], eos={2}, min_tokens=2) == ROW.tolist()


def test_the_row_given_is_not_changed():
    row = ROW.clone()
    adjust_logits_reference(row, SamplingParams(logit_bias={0: 1.0}, frequency_penalty=1.0), [], [0], set())
    assert torch.equal(row, ROW)


@pytest.mark.parametrize("seed", range(8))
def test_the_batched_rules_equal_the_one_row_rules_bit_for_bit(seed):
    """What the engine runs (every row at once) gives exactly what the plain one-row rules give, for rows
    that mix every rule, repeat tokens, and leave some rules or all of them off."""
    gen = torch.Generator().manual_seed(seed)
    vocab, rows = 50, 9
    logits = torch.randn(rows, vocab, generator=gen) * 3

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    params, prompts, outputs = [], [], []
    for _ in range(rows):
        pick = torch.rand(6, generator=gen).tolist()
        bias = {i: round(float(torch.randn(1, generator=gen)) * 5, 3) for i in set(ids(3))} if pick[0] < 0.5 else {}
        params.append(SamplingParams(
            max_tokens=20, logit_bias=bias, min_tokens=3 if pick[1] < 0.4 else 0,
            stop_token_ids=ids(2) if pick[1] < 0.2 else [], ignore_eos=pick[2] < 0.3,
            repetition_penalty=1.0 + round(pick[3], 2) if pick[3] < 0.6 else 1.0,
            frequency_penalty=round(pick[4] * 2 - 0.5, 2) if pick[4] < 0.7 else 0.0,
            presence_penalty=round(pick[5] - 0.3, 2) if pick[5] < 0.7 else 0.0))
        prompts.append(ids(int(torch.randint(0, 12, (1,), generator=gen))))
        outputs.append(ids(int(torch.randint(0, 6, (1,), generator=gen))))
    eos = {7}
    batched = adjust_logits_batch(logits, params, prompts, outputs, eos)
    one_by_one = torch.stack([adjust_logits_reference(logits[i], params[i], prompts[i], outputs[i], eos)
                              for i in range(rows)])
    assert torch.equal(batched, one_by_one)
    assert not torch.equal(batched, logits)  # the rules did something


@pytest.mark.parametrize("params, param", [
    (dict(min_p=1.5), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(logit_bias={3: 101}), "logit_bias"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=math.nan), "top_p"),
    (dict(min_p=math.nan), "min_p"),
    (dict(presence_penalty=math.nan), "presence_penalty"),
    (dict(frequency_penalty=math.nan), "frequency_penalty"),
    (dict(repetition_penalty=math.nan), "repetition_penalty"),
    (dict(logit_bias={3: math.nan}), "logit_bias"),
])
def test_out_of_range_values_are_refused(params, param):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**params).validate()
    assert err.value.param == param


def test_logit_bias_token_out_of_the_vocabulary_is_refused(engine):
    with pytest.raises(InvalidRequestError, match="logit_bias token id"):
        engine.submit("x", None, SamplingParams(logit_bias={engine.vocab_size: 1.0}))


def reference_penalised_greedy(model, prompt: list[int], n: int, freq: float, pres: float, rep: float,
                               bias: dict[int, float]) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        row = reference_logits(model, prompt + out)[-1].tolist()
        for t, b in bias.items():
            row[t] += b
        for t in set(prompt + out):
            row[t] = row[t] / rep if row[t] > 0 else row[t] * rep
        for t in set(out):
            row[t] -= freq * out.count(t) + pres
        out.append(max(range(len(row)), key=row.__getitem__))
    return out


def test_penalised_greedy_matches_the_reference_and_leaves_the_batch_alone(engine, adapters, tiny_model_dir):
    engine.start()
    prompt = engine.tokenize("the quick brown fox")
    rules = dict(frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3, logit_bias={7: 2.0})
    plain = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    penalised = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, **rules)
    alone = {name: engine.generate(prompt, name, plain).token_ids for name in (None, "a1")}
    handles = [engine.submit(prompt, "a0", penalised)] + [engine.submit(prompt, name, plain) for name in alone]
    outs = [h.result(timeout=60) for h in handles]
    expected = reference_penalised_greedy(reference(tiny_model_dir, (adapters["a0"], 1.0)), prompt, 10, 1.5, 0.5,
                                          1.3, {7: 2.0})
    assert outs[0].token_ids == expected
    assert outs[0].token_ids != engine.generate(prompt, "a0", plain).token_ids  # the rules changed something
    assert [o.token_ids for o in outs[1:]] == list(alone.values())


def test_logprobs_stay_the_models_own(engine):
    engine.start()
    prompt = engine.tokenize("hello there")
    forced = 11
    out = engine.generate(prompt, None, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2,
                                                       logit_bias={forced: 100.0}))
    assert out.token_ids == [forced] * 3
    model_lp = torch.log_softmax(engine.logits(prompt, None)[-1], dim=-1)[forced].item()
    assert out.logprobs[0].logprob == pytest.approx(model_lp, abs=1e-4)


def test_min_tokens_holds_back_eos(engine):
    engine.start()
    eos = engine.tokenizer.eos_token_id
    wants_eos = SamplingParams(max_tokens=8, temperature=0, logit_bias={eos: 100.0})
    assert engine.generate("hi", None, wants_eos).token_ids == [eos]
    out = engine.generate("hi", None, SamplingParams(max_tokens=8, temperature=0, logit_bias={eos: 100.0}, min_tokens=3))
    assert out.finish_reason == "stop" and len(out.token_ids) == 4 and out.token_ids[-1] == eos
    assert eos not in out.token_ids[:3]


def test_min_p_keeps_only_tokens_near_the_most_likely():
    """Probabilities 0.5, 0.3, 0.2 (and ~0): min_p 0.5 keeps tokens of at least 0.25, so never 2 or 3;
    without it token 2 comes up about a fifth of the time."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]]))
    gen = torch.Generator().manual_seed(0)
    drawn = {sample(logits, [SamplingParams(temperature=1.0, min_p=0.5)], [gen])[0] for _ in range(400)}
    assert drawn == {0, 1}
    free = [sample(logits, [SamplingParams(temperature=1.0)], [gen])[0] for _ in range(400)]
    assert 40 < free.count(2) < 120



def test_extreme_accepted_values_still_give_a_distribution():
    """Values the API accepts but that overflow float32 arithmetic: a temperature below 1e-5 samples
    greedily (vLLM's rule; dividing by 1e-300 gives inf and NaN), a top_p that rounds to 0 keeps the
    most likely token, and +inf logits (a tiny repetition penalty divides positive logits into +inf)
    share the draw evenly instead of making NaN."""
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0]])
    gen = torch.Generator().manual_seed(0)
    for extreme in (dict(temperature=1e-300), dict(temperature=9e-6), dict(top_p=1e-300), dict(top_p=1e-50)):
        assert {sample(logits, [SamplingParams(**extreme)], [gen])[0] for _ in range(50)} == {1}
    assert {sample(logits, [SamplingParams(temperature=2e-5)], [gen])[0] for _ in range(50)} == {1}  # sampled, sharp
    boosted = adjust_logits_batch(logits, [SamplingParams(repetition_penalty=1e-300)], [[0, 2, 3]], [[]], set())
    assert boosted[0, 0] == boosted[0, 2] == float("inf")
    drawn = [sample(boosted, [SamplingParams(temperature=1.0)], [gen])[0] for _ in range(200)]
    assert set(drawn) == {0, 2} and 60 < drawn.count(0) < 140


def test_a_row_with_no_distribution_gets_none_and_the_others_are_sampled():
    """NaN logits (a broken model) or every token at -inf give no distribution: that row gets None, which
    the engine turns into an error for that request alone; greedy rows still take their argmax."""
    logits = torch.tensor([[0.0, 1.0, 0.5], [float("nan"), 1.0, 0.0], [float("-inf")] * 3, [0.0, 0.0, 9.0]])
    params = [SamplingParams(temperature=1.0, top_k=1)] * 3 + [SamplingParams(temperature=0)]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    assert sample(logits, params, gens) == [1, None, None, 2]

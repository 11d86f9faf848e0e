"""The shared generation logic: adapter choice rules, and cancellation when the client goes away."""

from __future__ import annotations


import pytest

from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.errors import InvalidRequestError
from s2ft_serve.server.generation import ClientDisconnected, Generation, choose_adapter
from s2ft_serve.server.metrics import Metrics

LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)


class GoneClient:
    async def is_disconnected(self) -> bool:
        return True


def test_adapter_choice_rules(engine, settings):
    base = engine.model_name
    assert choose_adapter(engine, settings, None, None) is None
    assert choose_adapter(engine, settings, base, None) is None
    assert choose_adapter(engine, settings, settings.model, None) is None  # the --model path names the base
    assert choose_adapter(engine, settings, "a0", None) == "a0"
    assert choose_adapter(engine, settings, base, "a1") == "a1"
    assert choose_adapter(engine, settings, None, "a1") == "a1"
    assert choose_adapter(engine, settings, "a1", "a1") == "a1"
    assert choose_adapter(engine, settings, None, base) is None
    with pytest.raises(InvalidRequestError):
        choose_adapter(engine, settings, "a0", "a1")


async def test_disconnect_while_waiting_cancels_every_choice(engine):
    gen = Generation(engine, Metrics(), "a0")
    await gen.submit_many([(0, engine.tokenize("hello"), SamplingParams(**{**LONG.__dict__, "seed": seed}))
                           for seed in range(2)])
    with pytest.raises(ClientDisconnected):
        await gen.results(GoneClient())
    for choice in gen.choices:
        out = await choice.handle.aresult()
        assert out.finish_reason == "abort" and len(out.token_ids) < LONG.max_tokens


async def test_closing_the_stream_cancels_the_request(engine):
    gen = Generation(engine, Metrics(), None)
    await gen.submit_many([(0, engine.tokenize("hello"), LONG)])
    events = gen.events()
    await events.__anext__()
    await events.aclose()  # what StreamingResponse does when the client disconnects
    out = await gen.choices[0].handle.aresult()
    assert out.finish_reason == "abort" and len(out.token_ids) < LONG.max_tokens


async def test_tokens_of_a_request_cut_short_are_counted_once(engine):
    """QA: tokens were counted only when a choice finished, so a stream the client dropped added none."""
    metrics = Metrics()
    gen = Generation(engine, metrics, None)
    await gen.submit_many([(0, engine.tokenize("hello"), LONG)] * 2)
    events = gen.events()
    for _ in range(5):
        await events.__anext__()
    await events.aclose()
    outs = [await choice.handle.aresult() for choice in gen.choices]  # the engine ends them
    assert all(out.finish_reason == "abort" for out in outs)
    gen.account()
    gen.account()  # once, however many ends report it
    counted = metrics.generation_tokens.labels(adapter="")._value.get()
    # every token the engine made, also those still queued for the client that left (QA: uncounted)
    assert counted == sum(len(out.token_ids) for out in outs) >= 5
    assert metrics.prompt_tokens.labels(adapter="")._value.get() == len(engine.tokenize("hello"))


async def test_the_n_choices_of_a_request_share_one_prefill(engine):
    """The choices are queued at once, so the engine admits them in one step and computes the prompt once."""
    passes = []
    engine.add_step_listener(lambda rows, tokens: passes.append((rows, tokens)))
    ids = engine.tokenize("Twins: a prompt that no other test sends, long enough to notice twice over.")
    gen = Generation(engine, Metrics(), "a1")
    choices = await gen.submit_many([(0, ids, SamplingParams(max_tokens=3, temperature=1.0, seed=s, ignore_eos=True))
                                     for s in range(4)])
    outs = [await c.handle.aresult() for c in choices]
    assert passes == [(1, len(ids)), (4, 4), (4, 4)]  # the prompt once, then two decode steps of all four
    assert all(len(o.token_ids) == 3 for o in outs) and len({tuple(o.token_ids) for o in outs}) > 1

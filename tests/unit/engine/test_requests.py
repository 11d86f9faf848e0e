"""Sampling, stopping, streaming, async use, queue limits and input validation."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.errors import AdapterNotFoundError, InvalidRequestError, QueueFullError

from engine_reference import make_engine


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine, adapters):
    engine.start()
    p = dict(max_tokens=12, temperature=1.5, ignore_eos=True)
    a = engine.generate("fox", "a1", SamplingParams(seed=1, **p)).token_ids
    b = engine.generate("fox", "a1", SamplingParams(seed=1, **p)).token_ids
    c = engine.generate("fox", "a1", SamplingParams(seed=2, **p)).token_ids
    assert a == b and a != c


@pytest.mark.parametrize("narrow", [dict(top_k=1), dict(min_p=1.0)])
def test_top_k_one_and_min_p_one_are_greedy(engine, adapters, narrow):
    engine.start()
    greedy = engine.generate("fox", "a0", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)).token_ids
    sampled = engine.generate("fox", "a0", SamplingParams(max_tokens=8, temperature=0.9, seed=3, ignore_eos=True,
                                                          **narrow)).token_ids
    assert greedy == sampled


def test_stop_string_cuts_the_text(engine):
    engine.start()
    full = engine.generate("Hello", None, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert len(full.text) >= 3
    stop = full.text[2:4]
    out = engine.generate("Hello", None, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]))
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.find(stop)]


def test_stop_token_ids_and_eos(engine):
    engine.start()
    full = engine.generate("Hello", None, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    out = engine.generate("Hello", None, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                        stop_token_ids=[full.token_ids[2]]))
    first = full.token_ids.index(full.token_ids[2])
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: first + 1]


def test_streaming_events_add_up_to_the_result(engine, adapters):
    engine.start()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    events = list(engine.stream("What is", "a2", params))
    assert events[-1].finished and events[-1].finish_reason == "length"
    tokens = [e.token_id for e in events if e.token_id is not None]
    assert len(tokens) == 8
    out = engine.generate("What is", "a2", params)
    assert tokens == out.token_ids and "".join(e.text_delta for e in events) == out.text


def test_text_held_back_at_the_end_comes_with_the_last_token(engine):
    """An answer ending inside a character (or a stop string's possible start) releases the held text
    with its last token, not in a final event of its own (QA: a client counting one streamed chunk per
    token counted one too many)."""
    engine.start()
    tok = engine.tokenizer
    partial = next(i for i in range(len(tok)) if tok.decode([i]) == "\ufffd")  # one byte of a longer character
    for max_tokens, stop in ((2, []), (1, [tok.decode([5]) + "never"])):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, stop=stop,
                                logit_bias={partial if not stop else 5: 100.0})
        events = list(engine.stream("What is", None, params))
        out = engine.generate("What is", None, params)
        assert [e.token_id for e in events if e.token_id is not None] == out.token_ids and len(out.token_ids) == max_tokens
        assert out.text and events[-1].finished and events[-1].token_id is None and events[-1].text_delta == ""
        assert "".join(e.text_delta for e in events) == out.text


async def test_async_api(engine, adapters):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    sync = engine.generate("fox", "a1", params)
    outs = await asyncio.gather(*[engine.agenerate("fox", "a1", params) for _ in range(3)])
    assert all(o.token_ids == sync.token_ids for o in outs)
    streamed = [e.token_id async for e in engine.astream("fox", "a1", params) if e.token_id is not None]
    assert streamed == sync.token_ids


def test_batch_size_never_exceeds_the_limit(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, max_batch_size=3)
    sizes = []
    engine.add_step_listener(lambda b, t: sizes.append(b))
    engine.start()
    handles = [engine.submit("fox", None, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
               for _ in range(7)]
    assert all(h.result(timeout=60).num_generated_tokens == 5 for h in handles)
    assert max(sizes) == 3
    engine.shutdown()


def test_queue_full_raises(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, max_queue=2)  # not started: nothing leaves the queue
    params = SamplingParams(max_tokens=2)
    engine.submit("a", None, params)
    engine.submit("b", None, params)
    with pytest.raises(QueueFullError):
        engine.submit("c", None, params)


def test_a_group_larger_than_the_queue_is_invalid_not_queue_full(tiny_llama_dir):
    """More sequences in one group than the queue can ever hold is a bad request (400), not a 429
    that no retry could satisfy; a group that fits waits for room as before."""
    engine = make_engine(tiny_llama_dir, max_queue=2)
    params = SamplingParams(max_tokens=2)
    with pytest.raises(InvalidRequestError, match=r"3 sequences at once .* more than the request queue holds \(2\)"):
        engine.submit_many([("a", None, params)] * 3)
    engine.submit_many([("a", None, params)] * 2)
    with pytest.raises(QueueFullError):
        engine.submit("b", None, params)


def test_invalid_requests_are_refused(engine):
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        engine.submit([1] * engine.max_model_len, None, SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="out of range"):
        engine.submit([engine.vocab_size + 5], None)
    with pytest.raises(InvalidRequestError, match="temperature"):
        engine.submit("x", None, SamplingParams(temperature=-1))
    with pytest.raises(AdapterNotFoundError, match="The model 'nope' does not exist."):
        engine.submit("x", "nope")


def test_a_prompt_filling_the_context_is_scored_with_max_tokens_0(tiny_llama_dir):
    """QA: a prompt of exactly max_model_len tokens with max_tokens 0 (lm-eval's echo scoring) was
    refused with "maximum context length is 64 ... you requested 64"."""
    engine = make_engine(tiny_llama_dir, max_model_len=64).start()
    try:
        ids = list(range(5, 69))
        out = engine.generate(ids, None, SamplingParams(max_tokens=0, prompt_logprobs=0))
        assert out.token_ids == [] and len(out.prompt_logprobs) == 64 and out.prompt_logprobs[0] is None
        expected = engine.logits(ids).float().log_softmax(-1)
        assert abs(out.prompt_logprobs[-1].logprob - expected[-2, ids[-1]].item()) < 1e-4
        with pytest.raises(InvalidRequestError, match="you requested 65 tokens"):
            engine.submit(ids, None, SamplingParams(max_tokens=1))
    finally:
        engine.shutdown()


@pytest.mark.parametrize("field, value", [("max_batch_size", 0), ("max_batch_size", -1), ("max_tokens_per_step", 0),
                                          ("max_queue", 0), ("max_model_len", 0), ("prefix_cache_bytes", -1),
                                          ("speculative_tokens", -1), ("threads", 0), ("max_batch_size", 2.5),
                                          ("auto_fuse_share", 0.0), ("cuda_graphs", "no"), ("lazy_load", 0)])
def test_an_engine_config_it_cannot_run_with_is_refused(tiny_llama_dir, field, value):
    """QA: max_batch_size 0 (or a prefill budget of 0) was accepted and every request waited forever."""
    with pytest.raises(ValueError, match=f"{field} must be"):
        make_engine(tiny_llama_dir, **{field: value})


def test_cancel_aborts(engine):
    engine.start()
    handle = engine.submit("fox", None, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    handle.cancel()
    out = handle.result(timeout=30)
    assert out.finish_reason == "abort" and out.num_generated_tokens < 400


def test_cancelled_waiting_requests_free_their_queue_places(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, max_queue=2)  # not started: nothing leaves the queue by itself
    first = engine.submit("a", None, SamplingParams(max_tokens=2))
    engine.submit("b", None, SamplingParams(max_tokens=2))
    first.cancel()
    third = engine.submit("c", None, SamplingParams(max_tokens=2))  # takes the cancelled one's place
    assert first.result(timeout=5).finish_reason == "abort"
    engine.start()
    assert third.result(timeout=30).num_generated_tokens == 2
    engine.shutdown()


def test_extreme_sampling_values_run_beside_other_requests(engine, adapters):
    """A temperature, top_p or repetition penalty so small that float32 arithmetic overflows is served
    (greedy, the top token, an even draw among +inf logits), and the requests batched with it are not
    disturbed."""
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.start()
    alone = engine.generate("fox", "a1", greedy)
    extremes = [SamplingParams(max_tokens=8, ignore_eos=True, seed=1, **kw)
                for kw in (dict(temperature=1e-300), dict(top_p=1e-300), dict(repetition_penalty=1e-300))]
    handles = engine.submit_many([("fox", "a1", greedy)] + [("Hello there", "a0", p) for p in extremes])
    outs = [h.result(timeout=60) for h in handles]
    assert [o.finish_reason for o in outs] == ["length"] * 4
    assert outs[0].token_ids == alone.token_ids
    assert outs[1].token_ids == outs[2].token_ids == engine.generate("Hello there", "a0", greedy).token_ids


def test_a_row_that_cannot_be_sampled_ends_alone(engine, adapters, monkeypatch):
    """Should a row's logits give no distribution (the sampler's None), that request ends with
    finish_reason "error" and every other request in the batch goes on to the same tokens as alone."""
    from s2ft_serve.engine import stepper

    real = stepper.sample

    def broken_for_seed_13(logits, params, generators):
        return [None if p.seed == 13 else t for p, t in zip(params, real(logits, params, generators))]

    engine.start()
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = [engine.generate(prompt, name, greedy).token_ids for prompt, name in (("fox", "a1"), ("cat", None))]
    monkeypatch.setattr(stepper, "sample", broken_for_seed_13)
    handles = engine.submit_many([("fox", "a1", greedy), ("dog", "a2", SamplingParams(max_tokens=6, seed=13)),
                                  ("cat", None, greedy)])
    outs = [h.result(timeout=60) for h in handles]
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert outs[1].token_ids == [] and [outs[0].token_ids, outs[2].token_ids] == alone


def test_leaving_a_sync_stream_early_cancels_the_request(engine):
    """A `break` out of `Engine.stream` (the iterator then closed) ends the request in the engine, as
    leaving `astream` does; a timeout while waiting does not, so the caller may wait again."""
    import queue

    engine.start()
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    handle = engine.submit("fox", None, long)
    stream = handle.events()
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    out = handle.result(timeout=30)
    assert out.finish_reason == "abort" and out.num_generated_tokens < 400
    waiting = engine.submit("fox", None, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    with pytest.raises(queue.Empty):
        for _ in waiting.events(timeout=1e-6):
            pass
    assert waiting.result(timeout=30).finish_reason == "length"


def test_requests_served_counts_only_requests_taken(tiny_llama_dir):
    """An adapter's `requests_served` counts requests queued (and scoring calls run), not requests refused
    after their adapter was pinned: a group with an unknown adapter, or one the queue has no room for."""
    from s2ft_serve.model.testing import random_adapter

    engine = make_engine(tiny_llama_dir, max_queue=3)  # not started: nothing leaves the queue
    engine.add_adapter("a0", random_adapter(engine.loaded.model, engine.model_name, seed=1))
    g = SamplingParams(max_tokens=2, temperature=0)
    engine.submit_many([("Hi", "a0", g), ("Hi", None, g)])
    assert engine.get_adapter("a0").requests_served == 1
    with pytest.raises(AdapterNotFoundError):
        engine.submit_many([("Hi", "a0", g), ("Hi", "nope", g)])
    with pytest.raises(QueueFullError):
        engine.submit_many([("Hi", "a0", g), ("Hi", "a0", g)])
    assert engine.get_adapter("a0").requests_served == 1
    engine.submit("Hi", "a0", g)
    assert engine.get_adapter("a0").requests_served == 2
    engine.start()
    engine.logits(engine.tokenize("Hi"), "a0")
    assert engine.get_adapter("a0").requests_served == 3
    # a submission counts once, whatever its n (QA: one HTTP request with n = 4 counted as 4)
    [h.result(timeout=60) for h in engine.submit_many([("Hi", "a0", g)] * 3)]
    assert engine.get_adapter("a0").requests_served == 4
    engine.shutdown()


# ---- the Python API as applications use it (QA pass P) -------------------------------------------

@pytest.mark.parametrize("field, value", [("logprobs", True), ("prompt_logprobs", True), ("logprobs", 1.5),
                                          ("top_k", 2.5), ("temperature", "1"), ("seed", 2**64), ("seed", "7"),
                                          ("stop_token_ids", 5), ("logit_bias", {1: "x"}), ("max_tokens", 2.0)])
def test_wrong_typed_sampling_values_are_refused_naming_the_field(engine, field, value):
    """QA: `logprobs=True` or `top_k=2.5` passed validation, then failed the step of every request in the
    batch; other wrong types raised raw TypeErrors."""
    with pytest.raises(InvalidRequestError) as refused:
        SamplingParams(**{field: value}).validate()
    assert refused.value.param == field
    engine.start()
    with pytest.raises(InvalidRequestError):
        engine.submit("fox", None, SamplingParams(**{field: value}))
    assert engine.generate("fox", None, SamplingParams(max_tokens=2, temperature=0)).finish_reason == "length"


def test_one_stop_string_given_as_a_string_is_one_stop_string(engine):
    """QA: `stop="ver"` was taken as the stops "v", "e" and "r"."""
    assert SamplingParams(stop="ver").stop == ["ver"] and SamplingParams(stop=None).stop == []
    engine.start()
    free = engine.generate("fox", None, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)).text
    cut = free[3:5]
    out = engine.generate("fox", None, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=cut))
    assert out.text == free[: free.index(cut)] and out.finish_reason == "stop"


def test_a_failing_step_listener_is_logged_and_the_requests_go_on(engine, caplog):
    """QA: one raising listener ended every running request with "error"."""
    engine.add_step_listener(lambda batch, tokens: 1 / 0)
    with caplog.at_level("ERROR", logger="s2ft_serve.engine.stepper"):
        out = engine.generate("fox", None, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert out.finish_reason == "length" and out.num_generated_tokens == 5
    assert "step listener" in caplog.text and "ZeroDivisionError" in caplog.text


@pytest.mark.parametrize("how", ["result", "events"])
def test_an_interrupted_wait_cancels_the_request(engine, how):
    """QA: Ctrl-C (KeyboardInterrupt) during generate() or a sync stream left the request running to
    max_tokens, holding its batch row."""
    engine.start()
    handle = engine.submit("fox", None, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    get = handle._queue.get
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return get(*args, **kwargs)

    handle._queue.get = interrupted
    with pytest.raises(KeyboardInterrupt):
        if how == "result":
            handle.result(timeout=60)
        else:
            for _ in handle.events(timeout=60):
                pass
    handle._queue.get = get
    out = handle.result(timeout=60)
    assert out.finish_reason == "abort" and out.num_generated_tokens < 400


def test_result_timeout_is_a_deadline_for_the_whole_request(engine):
    """QA: `result(timeout)` waited per event (0.5 s asked, 2.2 s taken) and raised queue.Empty."""
    engine.start()
    handle = engine.submit("fox", None, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    with pytest.raises(TimeoutError, match="did not finish within 0.05 s"):
        handle.result(timeout=0.05)
    assert handle.result(timeout=120).finish_reason == "length"  # it went on: the caller may wait again


async def test_an_async_submission_cancelled_midway_cancels_what_it_queued(engine, monkeypatch):
    """QA: cancelling asubmit while its submission ran in a thread left an orphan request running to
    max_tokens that nobody could cancel."""
    import threading

    engine.start()
    submitted, release = [], threading.Event()
    original = engine.submit_many

    def slow(requests):
        release.wait(10)
        handles = original(requests)
        submitted.extend(handles)
        return handles

    monkeypatch.setattr(engine, "submit_many", slow)
    task = asyncio.ensure_future(engine.asubmit("fox", None, SamplingParams(max_tokens=400, temperature=0,
                                                                            ignore_eos=True)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    for _ in range(200):
        if submitted:
            break
        await asyncio.sleep(0.05)
    out = await asyncio.to_thread(submitted[0].result, 60)
    assert out.finish_reason == "abort" and out.num_generated_tokens < 400


def test_an_engine_is_a_context_manager(tiny_llama_dir):
    """QA: an engine dropped without shutdown() kept its thread, weights and cache."""
    with make_engine(tiny_llama_dir) as engine:
        assert engine.generate("fox", None, SamplingParams(max_tokens=2, temperature=0)).num_generated_tokens <= 2
    assert not engine._thread._thread.is_alive()


def test_engines_built_at_once_in_two_threads_both_serve(tiny_llama_dir):
    """QA: two Engines built at the same time in two threads failed ("Cannot copy out of meta tensor"):
    transformers' from_pretrained is not thread-safe."""
    import threading

    engines, errors = [], []

    def build():
        try:
            engines.append(make_engine(tiny_llama_dir).start())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not errors and len(engines) == 2
        outs = [e.generate("fox", None, SamplingParams(max_tokens=4, temperature=0)).token_ids for e in engines]
        assert outs[0] == outs[1]
    finally:
        for e in engines:
            e.shutdown()


def test_another_model_loaded_meanwhile_does_not_break_the_steps(engine, tiny_llama_dir):
    """QA: loading any bfloat16 model in the process while an engine served (transformers switches torch's
    default dtype while loading) made the engine's probes for new row counts bfloat16, and its steps fail."""
    engine.start()
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    before = engine.generate("fox", None, params).token_ids
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as from_pretrained(dtype=bfloat16) does meanwhile
    try:
        outs = [h.result(timeout=60) for h in [engine.submit("fox", None, params) for _ in range(7)]]  # new row counts
    finally:
        torch.set_default_dtype(previous)
    assert all(o.finish_reason == "length" and o.token_ids == before for o in outs)


def test_a_waiting_request_cancelled_ends_at_once(tiny_llama_dir):
    """QA: cancel() on a request waiting for a batch row was acknowledged only when a running request
    finished (3.1 s in the repro): the caller's result() waited that long."""
    with make_engine(tiny_llama_dir, max_batch_size=1) as engine:
        running = engine.submit("fox", None, SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        stream = running.events(timeout=30)
        next(stream), next(stream)  # it holds the only row
        waiting = engine.submit("dog", None, SamplingParams(max_tokens=4, temperature=0))
        time.sleep(0.05)  # a few steps with it waiting
        waiting.cancel()
        out = waiting.result(timeout=30)
        assert out.finish_reason == "abort" and out.num_generated_tokens == 0
        assert engine.stats().running == 1  # it ended while the running request still ran
        running.cancel()


def test_aevents_of_a_sync_handle_is_a_clear_error(engine):
    handle = engine.submit("fox", None, SamplingParams(max_tokens=2, temperature=0))

    async def read():
        async for _ in handle.aevents():
            pass

    with pytest.raises(RuntimeError, match="use Engine.asubmit"):
        asyncio.run(read())
    handle.cancel()


async def test_the_blocking_readers_of_an_async_handle_are_a_clear_error(engine):
    """QA: `result()` on an `asubmit()` handle blocked forever (its events go to the event loop), or with
    a timeout raised TimeoutError for a request that had finished."""
    engine.start()
    handle = await engine.asubmit("fox", None, SamplingParams(max_tokens=2, temperature=0))
    with pytest.raises(RuntimeError, match="came from asubmit"):
        handle.result(timeout=5)
    with pytest.raises(RuntimeError, match="came from asubmit"):
        next(iter(handle.events()))
    out = await handle.aresult()
    assert handle.result() == out  # once it has ended, the output is there for any reader


def test_out_of_range_stop_token_ids_are_refused(engine):
    """QA: with min_tokens, an id out of range banned a token in another request's row (flat indices),
    or failed the whole step."""
    for bad in (-5, engine.vocab_size, 10 * engine.vocab_size):
        with pytest.raises(InvalidRequestError, match="stop_token_ids") as err:
            engine.submit("fox", None, SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[3, bad]))
        assert err.value.param == "stop_token_ids"
    assert not engine.scheduler.waiting


def test_the_end_ids_ban_stays_in_its_own_row():
    """The sampler itself never writes outside a row, whatever ids it is handed."""
    from s2ft_serve.engine.sampler import adjust_logits_batch

    logits = torch.zeros(2, 10)
    params = [SamplingParams(min_tokens=2), SamplingParams(min_tokens=2, stop_token_ids=[-3, 12, 4])]
    out = adjust_logits_batch(logits, params, [[1], [1]], [[], []], eos_ids=set())
    assert torch.equal(out[0], logits[0])
    assert torch.isinf(out[1, 4]) and torch.isfinite(out[1]).sum() == 9


def test_a_failed_step_answers_what_it_admitted_and_had_not_started(engine, adapters, monkeypatch):
    """QA: a step that raised finished only the running requests: those admitted in the same step for a
    later prefill group, and twins, were never answered and kept their adapters pinned."""
    from s2ft_serve.engine import stepper

    real = stepper.sample

    def fails_for_seed_13(logits, params, generators):
        if any(p.seed == 13 for p in params):
            raise RuntimeError("boom")
        return real(logits, params, generators)

    monkeypatch.setattr(stepper, "sample", fails_for_seed_13)
    p = SamplingParams(max_tokens=4, temperature=0)
    handles = engine.submit_many([([9, 10, 11], "a0", SamplingParams(max_tokens=4, seed=13)),  # short: group 1
                                  ([9, 10, 11], "a0", SamplingParams(max_tokens=4, seed=13)),  # its twin
                                  (list(range(5, 45)), "a1", p),  # long: a later group
                                  (list(range(5, 45)), "a1", p)])  # and its twin
    engine.start()
    outs = [h.result(timeout=60) for h in handles]
    assert [o.finish_reason for o in outs] == ["error"] * 4
    assert all(engine.registry.entries[name].version.refs == 0 for name in ("a0", "a1"))
    assert not engine.scheduler.has_work()
    monkeypatch.setattr(stepper, "sample", real)  # and the engine goes on
    assert engine.generate(list(range(5, 45)), "a1", p).finish_reason == "length"


def test_a_request_prepared_while_the_engine_shuts_down_is_refused(engine):
    """QA: checked once before it was prepared (tokenized, its adapter read), it was queued after the
    shutdown's last step and never answered."""
    import threading

    from s2ft_serve.errors import EngineNotReadyError

    engine.start()
    prepared, release = threading.Event(), threading.Event()
    real = engine._prompt_ids

    def slow(prompt):
        prepared.set()
        release.wait(10)
        return real(prompt)

    engine._prompt_ids = slow
    outcome = {}

    def client():
        try:
            outcome["handle"] = engine.submit("Hello", None, SamplingParams(max_tokens=4))
        except EngineNotReadyError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=client)
    thread.start()
    assert prepared.wait(10)
    engine.shutdown(timeout=5)
    release.set()
    thread.join(10)
    assert "error" in outcome and "handle" not in outcome
    assert not engine.scheduler.waiting


def test_a_chat_template_failing_otherwise_is_a_bad_request(engine, monkeypatch):
    """QA: a template raising anything but a template, value or type error was a 500."""
    def divides_by_zero(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(engine.tokenizer, "apply_chat_template", divides_by_zero)
    with pytest.raises(InvalidRequestError, match="chat template failed.*ZeroDivisionError") as err:
        engine.apply_chat_template([{"role": "user", "content": "hi"}])
    assert err.value.param == "messages"

    def server_fault(*args, **kwargs):
        raise RuntimeError("Already borrowed")

    monkeypatch.setattr(engine.tokenizer, "apply_chat_template", server_fault)
    with pytest.raises(RuntimeError):  # the server's own fault stays a 500, with its traceback (QA: a 400)
        engine.apply_chat_template([{"role": "user", "content": "hi"}])


def test_an_empty_prompt_needs_a_token_to_start_from(engine, monkeypatch):
    """QA: with neither BOS nor EOS in the tokenizer, an empty prompt was a TypeError (a 500)."""
    class WithoutEither:
        bos_token_id = eos_token_id = None

        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

    monkeypatch.setattr(engine, "tokenizer", WithoutEither(engine.tokenizer))
    with pytest.raises(InvalidRequestError, match="no BOS or EOS"):
        engine.submit([], None, SamplingParams(max_tokens=2))

"""The load tester against a fake OpenAI-compatible server: requests, streaming, loops, errors."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from fake_openai import BASE
from loadtest.client import Target, error_message, send
from loadtest.runner import run_workload
from loadtest.stats import render_summary, summarize
from loadtest.workload import LengthDist, RequestSpec, WorkloadSpec


def spec(**kw) -> WorkloadSpec:
    base = dict(adapters=[None], prompt_len=LengthDist.parse("4"), output_len=LengthDist.parse("6"), num_requests=12)
    base.update(kw)
    return WorkloadSpec(**base)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_one_request_is_measured(fake_server, endpoint, stream):
    url, state = fake_server
    target = Target(base_url=url, base_model=BASE, endpoint=endpoint, stream=stream)

    async def go():
        async with httpx.AsyncClient(base_url=url) as client:
            return await send(client, RequestSpec(0, None, "a b c", 5, 1), target, 0.0)

    r = asyncio.run(go())
    assert r.ok and r.outcome == "ok" and r.output_tokens == 5 and r.prompt_tokens == 3
    assert len(r.text.split()) == 5
    assert (r.ttft_s is not None) == stream and (r.tpot_s is not None) == stream
    if stream:
        assert 0 <= r.ttft_s <= r.e2e_s
    body = state.bodies[-1]
    assert body["model"] == BASE and body["temperature"] == 0.0 and body["max_tokens"] == 5
    assert ("messages" in body) == (endpoint == "chat")
    assert ("stream_options" in body) == stream


def test_streaming_without_usage_counts_chunks(fake_server):
    url, _ = fake_server
    target = Target(base_url=url, base_model=BASE, stream=True, stream_usage=False)
    run = asyncio.run(run_workload(spec(num_requests=3, concurrency=1), target))
    assert [r.output_tokens for r in run.results] == [6, 6, 6]
    assert all(r.prompt_tokens == 0 for r in run.results)


@pytest.mark.parametrize("stream", [False, True])
def test_cached_prompt_tokens_are_reported(fake_server, stream):
    """Ten one-at-a-time prompts of 20 shared + 4 own words: the fake's word-level prefix cache
    answers at least the shared part of all but the first (a random word may match too)."""
    url, _ = fake_server
    target = Target(base_url=url, base_model=BASE, stream=stream)
    run = asyncio.run(run_workload(spec(num_requests=10, concurrency=1, shared_prefix=20), target))
    cached = [r.cached_tokens for r in run.results]
    assert cached[0] == 0 and all(20 <= c < 24 for c in cached[1:])
    summary = summarize(run.results, 1.0)
    assert summary.cached_prompt_fraction == pytest.approx(sum(cached) / 240) and summary.cached_prompt_fraction >= 0.75
    assert f"prompt tokens from the prefix cache | {sum(cached) / 240:.1%}" in render_summary(summary)


def test_closed_loop_sends_every_request_once(fake_server):
    url, state = fake_server
    state.adapters.update({"a": "/x/a", "b": "/x/b"})
    target = Target(base_url=url, base_model=BASE)
    run = asyncio.run(run_workload(spec(adapters=["a", "b"], num_requests=30, concurrency=5), target))
    assert [r.index for r in run.results] == list(range(30))
    assert all(r.ok for r in run.results)
    assert {b["model"] for b in state.bodies} == {"a", "b"}
    assert run.wall_s > 0


def test_open_loop_and_duration(fake_server):
    url, _ = fake_server
    target = Target(base_url=url, base_model=BASE)
    run = asyncio.run(run_workload(spec(num_requests=None, duration_s=0.5, concurrency=None, rate=40.0), target))
    assert 1 <= len(run.results) <= 60 and all(r.ok for r in run.results)  # about 20 expected
    assert [r.index for r in run.results] == list(range(len(run.results)))


def test_the_timeout_bounds_a_whole_stream_and_a_stream_must_end_with_done(fake_server):
    """QA: --timeout bounded each read, so a stream of slow tokens ran past it and counted as ok; a
    stream the server closed before data: [DONE] counted as ok too."""
    url, state = fake_server
    state.piece_delay_s = 0.15  # six pieces: about 0.9 s, each read well within the timeout
    slow = Target(base_url=url, base_model=BASE, stream=True, timeout_s=0.5)
    result = asyncio.run(run_workload(spec(num_requests=1, concurrency=1), slow)).results[0]
    assert result.error_kind == "timeout" and not result.ok and result.e2e_s < 0.8
    state.piece_delay_s, state.drop_done = 0.0, True
    cut = asyncio.run(run_workload(spec(num_requests=1, concurrency=1), Target(base_url=url, base_model=BASE,
                                                                               stream=True))).results[0]
    assert cut.error_kind == "protocol" and "before data: [DONE]" in cut.error


def test_an_open_loop_behind_its_schedule_says_so_and_stops_at_the_deadline(fake_server, monkeypatch, capsys):
    """QA: at a rate the client could not keep, it sent requests seconds late, past --duration, and the
    report still said the rate asked for."""
    import time

    import loadtest.runner as runner

    real_send, sent_at = runner.send, []

    async def busy(*args):
        time.sleep(0.05)  # a client too busy to keep a 100/s schedule
        return await real_send(*args)

    def recording_send(*args):  # called when the open loop sends (creates the request's task)
        sent_at.append(time.perf_counter())
        return busy(*args)

    monkeypatch.setattr(runner, "send", recording_send)
    url, _ = fake_server
    started = time.perf_counter()
    asyncio.run(run_workload(spec(num_requests=None, duration_s=0.6, concurrency=None, rate=100.0),
                             Target(base_url=url, base_model=BASE)))
    assert sent_at and max(sent_at) - started < 0.6 + 0.1  # nothing sent after the deadline
    assert "fell behind its schedule" in capsys.readouterr().err


def test_errors_are_counted_not_raised(fake_server):
    url, state = fake_server
    state.max_in_flight = 0
    target = Target(base_url=url, base_model=BASE, stream=True)
    run = asyncio.run(run_workload(spec(adapters=[None, "missing"], num_requests=20, concurrency=4), target))
    outcomes = {r.outcome for r in run.results}
    assert outcomes == {"429", "404"}
    missing = next(r for r in run.results if r.outcome == "404")
    assert missing.error == "The model 'missing' does not exist."


def test_unreachable_server_is_a_transport_outcome():
    target = Target(base_url="http://127.0.0.1:9", base_model=BASE, timeout_s=2)
    run = asyncio.run(run_workload(spec(num_requests=2, concurrency=1), target))
    assert [r.outcome for r in run.results] == ["transport", "transport"] and run.results[0].status == 0


@pytest.mark.parametrize("body,expected", [
    (json.dumps({"error": {"message": "boom", "type": "x"}}), "boom"),
    (json.dumps({"detail": "bad"}), "bad"),
    (json.dumps({"error": "plain"}), "plain"),
    ("Internal Server Error", "Internal Server Error"),
])
def test_error_messages(body, expected):
    assert error_message(body) == expected


@pytest.mark.parametrize("choice,expected", [
    ({"text": "a"}, True),
    ({"text": ""}, True),  # a token that decodes to no text yet still arrived
    ({"text": "", "finish_reason": "length"}, False),
    ({"text": "b", "finish_reason": "stop"}, True),
    ({"delta": {"role": "assistant", "content": ""}}, False),
    ({"delta": {"content": "x"}}, True),
    ({"delta": {"role": None, "content": "x"}}, True),  # servers that write every field, unset ones as null
    ({"delta": {"role": "assistant", "content": "x"}}, True),  # or repeat the role
    ({"delta": {"role": None, "content": None}, "finish_reason": "stop"}, False),
    ({"delta": {}, "finish_reason": "stop"}, False),
])
def test_token_chunks(choice, expected):
    from loadtest.client import is_token_chunk

    assert is_token_chunk(choice) is expected

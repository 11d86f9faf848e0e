"""`/v1/completions`: results match the engine, n/seed/stop, streaming, logprobs, echo, usage, adapters."""

from __future__ import annotations

import asyncio
import json

import torch
from server_helpers import client_for, make_server_engine

from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.server.app import create_app

PROMPT = "The quick brown fox"


def sse_payloads(text: str) -> list:
    lines = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


async def complete(client, **body):
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r


async def test_greedy_text_matches_engine_for_base_and_adapter(client, engine):
    for adapter in (None, "a0", "a1"):
        expected = engine.generate(PROMPT, adapter, SamplingParams(max_tokens=8, temperature=0))
        r = await complete(client, **({"adapter": adapter} if adapter else {}))
        body = r.json()
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == expected.text
        assert body["choices"][0]["finish_reason"] == expected.finish_reason
        assert body["model"] == (adapter or engine.model_name)
        assert r.headers["x-adapter-id"] == (adapter or engine.model_name)
        assert body["usage"] == {"prompt_tokens": len(expected.prompt_token_ids),
                                 "completion_tokens": len(expected.token_ids),
                                 "total_tokens": len(expected.prompt_token_ids) + len(expected.token_ids),
                                 "prompt_tokens_details": {"cached_tokens": expected.cached_tokens}}


async def test_adapters_give_different_text(client):
    texts = {a: (await complete(client, model=a, max_tokens=12)).json()["choices"][0]["text"] for a in ("a0", "a1")}
    base = (await complete(client, max_tokens=12)).json()["choices"][0]["text"]
    assert len({texts["a0"], texts["a1"], base}) == 3


async def test_model_naming_adapter_equals_adapter_field(client, engine):
    by_model = (await complete(client, model="a1")).json()
    by_field = (await complete(client, model=engine.model_name, adapter="a1")).json()
    assert by_model["choices"][0]["text"] == by_field["choices"][0]["text"]
    assert by_model["model"] == by_field["model"] == "a1"


async def test_n_choices_use_seed_plus_index(client, engine):
    body = (await complete(client, n=3, seed=7, temperature=1.0, max_tokens=10)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for i, choice in enumerate(body["choices"]):
        alone = engine.generate(PROMPT, None, SamplingParams(max_tokens=10, temperature=1.0, seed=7 + i))
        assert choice["text"] == alone.text


async def test_n_choices_at_the_largest_seed_wrap_around(client, engine):
    """QA: seed 2**63 - 1 with n = 2 gave choice 1 the seed 2**63, refused as invalid."""
    top = 2**63 - 1
    body = (await complete(client, n=2, seed=top, temperature=1.0, max_tokens=6)).json()
    for choice, seed in zip(body["choices"], (top, -(2**63))):
        alone = engine.generate(PROMPT, None, SamplingParams(max_tokens=6, temperature=1.0, seed=seed))
        assert choice["text"] == alone.text


async def test_several_prompts_and_token_ids(client, engine):
    ids = engine.tokenize("Hello world")
    body = (await complete(client, prompt=[PROMPT, "Hello world"], n=2)).json()
    assert len(body["choices"]) == 4
    by_ids = (await complete(client, prompt=ids)).json()
    assert by_ids["choices"][0]["text"] == body["choices"][2]["text"] == body["choices"][3]["text"]
    nested = (await complete(client, prompt=[ids, ids])).json()
    assert [c["text"] for c in nested["choices"]] == [by_ids["choices"][0]["text"]] * 2


async def test_stop_string_ends_text_before_it(client):
    full = (await complete(client, max_tokens=16)).json()["choices"][0]["text"]
    stop = full[3:5]
    assert stop and stop in full
    cut = (await complete(client, max_tokens=16, stop=stop)).json()["choices"][0]
    assert cut["text"] == full[: full.index(stop)]
    assert cut["finish_reason"] == "stop"


async def test_stream_matches_non_stream(client):
    whole = (await complete(client, adapter="a0", n=2, seed=3, temperature=0.8)).json()
    r = await complete(client, adapter="a0", n=2, seed=3, temperature=0.8, stream=True,
                       stream_options={"include_usage": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-adapter-id"] == "a0"
    chunks = sse_payloads(r.text)
    for choice in whole["choices"]:
        pieces = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice["index"]]
        assert "".join(p["text"] for p in pieces) == choice["text"]
        assert pieces[-1]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["model"] == "a0" for c in chunks)


async def test_logprobs_shape_and_values(client, engine):
    body = (await complete(client, adapter="a1", logprobs=3, max_tokens=5)).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
    text = body["choices"][0]["text"]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert token in top and len(top) == 3  # greedy: the chosen token is among the top 3, every key distinct
        assert logprob >= max(top.values()) - 1e-6  # greedy: the chosen token is the most likely
    # offsets count characters of the text: in order, inside it (QA: they ran past its end)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert lp["text_offset"][-1] < len(text) or not text


async def test_echo_with_zero_max_tokens_returns_prompt_logprobs(client, engine):
    ids = engine.tokenize(PROMPT)
    body = (await complete(client, adapter="a0", echo=True, max_tokens=0, logprobs=1)).json()
    choice = body["choices"][0]
    assert choice["text"] == PROMPT
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["token_logprobs"]) == len(ids)
    reference = torch.log_softmax(engine.logits(ids, "a0"), dim=-1)
    for pos in range(1, len(ids)):
        assert abs(lp["token_logprobs"][pos] - reference[pos - 1, ids[pos]].item()) < 1e-4
    assert body["usage"]["completion_tokens"] == 0


async def test_echo_prepends_prompt_text(client):
    plain = (await complete(client)).json()["choices"][0]["text"]
    echoed = (await complete(client, echo=True)).json()["choices"][0]["text"]
    assert echoed == PROMPT + plain


async def test_stream_sends_a_chunk_per_token(client):
    r = await complete(client, stream=True, max_tokens=6, ignore_eos=True)
    chunks = sse_payloads(r.text)
    assert len(chunks) in (6, 7)  # one per token (the end may ride on the last token or come alone)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_long_prompts_prefilled_in_chunks_answer_as_in_one_pass(settings, engine, adapter_root):
    """A server whose prefill budget (3 tokens per step) is far below the prompts' length: several
    concurrent requests, chunked one after another between decode steps, answer exactly as the
    module's engine (whole-prompt prefill) does, with the same prompt logprobs."""
    prompts = [PROMPT + " jumps over the lazy dog " * k for k in (1, 2, 3)]
    small = make_server_engine(settings.model, adapter_root, max_tokens_per_step=3)
    try:
        small.load_adapter("a0", str(adapter_root / "a0"))
        async with client_for(create_app(settings, small)) as c:
            bodies = [{"prompt": p, "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 1,
                       **({"adapter": "a0"} if i % 2 else {})} for i, p in enumerate(prompts)]
            got = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))
        for b, r in zip(bodies, got):
            assert r.status_code == 200, r.text
            expected = engine.generate(b["prompt"], b.get("adapter"), SamplingParams(max_tokens=6, temperature=0,
                                                                                   prompt_logprobs=1))
            choice = r.json()["choices"][0]
            assert choice["text"] == b["prompt"] + expected.text
            want = [None] + [lp.logprob for lp in expected.prompt_logprobs[1:]]
            have = choice["logprobs"]["token_logprobs"][: len(want)]
            assert have[0] is None
            assert all(abs(h - w) <= 1e-4 for h, w in zip(have[1:], want[1:]))
    finally:
        small.shutdown(timeout=5)


async def test_special_tokens_are_left_out_of_the_text_unless_asked_for(client, engine):
    """vLLM's `skip_special_tokens`; a token that ends the answer (a stop token id, EOS) is never text."""
    special = engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
    body = {"prompt": "x", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "logit_bias": {str(special): 100}}
    hidden = (await client.post("/v1/completions", json=body)).json()
    assert hidden["choices"][0]["text"] == "" and hidden["usage"]["completion_tokens"] == 3
    shown = (await client.post("/v1/completions", json={**body, "skip_special_tokens": False})).json()
    assert shown["choices"][0]["text"] == "<|im_start|>" * 3
    ended = (await client.post("/v1/completions", json={**body, "skip_special_tokens": False,
                                                          "stop_token_ids": [special]})).json()["choices"][0]
    assert ended["text"] == "" and ended["finish_reason"] == "stop"
    normal = engine.tokenize(" the")[-1]  # an ordinary token as a stop token id: not in the text either
    cut = (await client.post("/v1/completions", json={**body, "logit_bias": {str(normal): 100},
                                                        "stop_token_ids": [normal]})).json()["choices"][0]
    assert cut["text"] == "" and cut["finish_reason"] == "stop"


async def test_include_stop_str_in_output(client, engine):
    token = engine.tokenize(" the")[-1]
    piece = engine.tokenizer.decode([token])
    body = {"prompt": "x", "max_tokens": 4, "temperature": 0, "logit_bias": {str(token): 100}}
    for stop_field, stop_text in (({"stop": [piece * 2]}, piece * 2), ({"stop_token_ids": [token]}, piece)):
        cut = (await client.post("/v1/completions", json={**body, **stop_field})).json()["choices"][0]
        kept = (await client.post("/v1/completions", json={**body, **stop_field,
                                                            "include_stop_str_in_output": True})).json()["choices"][0]
        assert cut["finish_reason"] == kept["finish_reason"] == "stop"
        assert (cut["text"], kept["text"]) == ("", stop_text)


async def test_continuous_usage_stats_in_every_chunk(client):
    """vLLM's stream_options.continuous_usage_stats: each chunk carries the usage so far."""
    for path, body in (("/v1/completions", {"prompt": "hello there"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = await client.post(path, json={**body, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True,
                                          "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        usages = [c["usage"] for c in chunks]
        assert all(u is not None for u in usages)
        done = [u["completion_tokens"] for u in usages]
        assert done == sorted(done) and done[-1] == 5 and usages[-1]["prompt_tokens"] > 0
        plain = await client.post(path, json={**body, "max_tokens": 2, "stream": True,
                                              "stream_options": {"include_usage": True}})
        plain_chunks = [json.loads(line[6:]) for line in plain.text.splitlines() if line.startswith("data: {")]
        assert [c.get("usage") is not None for c in plain_chunks].count(True) == 1  # only the last one


async def test_prompts_are_tokenized_off_the_event_loop(client, engine, monkeypatch):
    """Tokenizing (and rendering a chat) runs in a worker thread: a long prompt keeps every other
    request and stream of the server waiting otherwise (QA: an 18 MB prompt held /health for 9 s)."""
    import threading

    loop_thread = threading.get_ident()
    seen = []
    tokenize = engine.tokenize

    def recording(text, *args, **kwargs):
        seen.append(threading.get_ident())
        return tokenize(text, *args, **kwargs)

    monkeypatch.setattr(engine, "tokenize", recording)
    r = await client.post("/v1/completions", json={"prompt": ["Hello", "there"], "max_tokens": 1})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert len(seen) == 3 and loop_thread not in seen


async def test_streamed_echo_with_logprobs_equals_the_whole_answer(client):
    """QA: refused with a 400 when streaming; vLLM sends each choice's prompt with its logprobs first."""
    body = dict(echo=True, logprobs=2, n=2, seed=3, temperature=1.0, max_tokens=6)
    whole = (await complete(client, **body)).json()["choices"]
    chunks = sse_payloads((await complete(client, stream=True, **body)).text)
    for i, choice in enumerate(whole):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["text"] == PROMPT and len(mine[0]["logprobs"]["tokens"]) > 1
        assert "".join(c["text"] for c in mine) == choice["text"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [v for c in mine if c["logprobs"] for v in c["logprobs"][key]] == choice["logprobs"][key], key

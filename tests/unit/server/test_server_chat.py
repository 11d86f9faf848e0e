"""`/v1/chat/completions`: the chat template, adapters, streaming, logprobs, n."""

from __future__ import annotations

import json

from s2ft_serve.engine.request import SamplingParams

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


async def chat(client, **body):
    r = await client.post("/v1/chat/completions",
                          json={"messages": MESSAGES, "max_tokens": 10, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r


async def test_chat_matches_engine_on_the_chat_template(client, engine):
    prompt = engine.apply_chat_template(MESSAGES)
    for adapter in (None, "a0"):
        expected = engine.generate(prompt, adapter, SamplingParams(max_tokens=10, temperature=0))
        r = await chat(client, **({"model": adapter} if adapter else {}))
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
        assert body["model"] == r.headers["x-adapter-id"] == (adapter or engine.model_name)
        assert body["usage"]["prompt_tokens"] == len(prompt)
        assert body["usage"]["completion_tokens"] == len(expected.token_ids)


async def test_content_parts_equal_plain_content(client):
    """Text parts are joined with newlines, as vLLM joins them (QA: joined with nothing, a client moving
    between the two got other prompts)."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 2?"}]}]
    plain = [{"role": "user", "content": "What is\n2 + 2?"}]
    from s2ft_serve.server.protocol import ChatMessage
    assert ChatMessage.model_validate(parts[0]).text() == plain[0]["content"]
    a = (await chat(client, messages=parts)).json()["choices"][0]["message"]["content"]
    b = (await chat(client, messages=plain)).json()["choices"][0]["message"]["content"]
    assert a == b


async def test_chat_stream_role_first_then_content_then_done(client):
    whole = (await chat(client, adapter="a1")).json()["choices"][0]
    r = await chat(client, adapter="a1", stream=True, stream_options={"include_usage": True})
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "a1" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert not any("role" in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])  # only the first
    assert chunks[-2]["choices"][0]["delta"] == {}  # the finish chunk adds nothing, as OpenAI's
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == whole["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == [whole["finish_reason"]]
    assert chunks[-1]["usage"]["completion_tokens"] > 0


async def test_chat_logprobs_top_n(client):
    body = (await chat(client, logprobs=True, top_logprobs=2, max_tokens=4)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert len(entry["top_logprobs"]) == 2
        assert entry["logprob"] >= entry["top_logprobs"][0]["logprob"] - 1e-6
    # the tokens' bytes join into the answer (QA: a part of a character had the bytes of U+FFFD)
    joined = bytes(b for entry in content for b in entry["bytes"])
    assert joined.decode("utf-8", errors="replace") == body["choices"][0]["message"]["content"]


async def test_chat_n_with_seed_is_reproducible(client):
    a = (await chat(client, n=2, seed=5, temperature=1.0)).json()
    b = (await chat(client, n=2, seed=5, temperature=1.0)).json()
    assert [c["message"] for c in a["choices"]] == [c["message"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1]

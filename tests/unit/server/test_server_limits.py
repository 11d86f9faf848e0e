"""Bounds on what one request may cost before it is refused (QA security pass: memory, not speed)."""

from __future__ import annotations

import json

from server_helpers import client_for

from s2ft_serve.server.app import create_app

COMPLETION = {"prompt": "hi", "max_tokens": 1}


async def test_request_bodies_beyond_the_limit_are_refused_as_they_are_read(settings, engine):
    """QA: nothing bounded a body (a 20 MB /tokenize body took 3.9 GB). A declared length beyond the limit,
    and a chunked body without one, get a 413 in OpenAI's shape; smaller ones are served."""
    app = create_app(settings.model_copy(update={"max_request_bytes": 1000}), engine)
    big = {"prompt": "x" * 2000, "max_tokens": 1}
    async with client_for(app) as c:
        r = await c.post("/v1/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        async def chunks():  # no Content-Length: counted as it arrives
            body = json.dumps(big).encode()
            for i in range(0, len(body), 300):
                yield body[i: i + 300]

        r = await c.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]
        assert (await c.post("/v1/completions", json=COMPLETION)).status_code == 200
    async with client_for(create_app(settings.model_copy(update={"max_request_bytes": 0}), engine)) as c:
        r = await c.post("/v1/completions", json=big)  # no limit: refused for its length, not its bytes
        assert r.status_code == 400


async def test_tokenize_refuses_a_prompt_no_context_holds_before_tokenizing_it(client, engine, monkeypatch):
    """QA: /tokenize skipped the check /v1/completions makes, so a 10 MB prompt was tokenized (2 GB)."""
    calls = []
    original = engine.tokenize
    monkeypatch.setattr(engine, "tokenize", lambda *a, **k: calls.append(1) or original(*a, **k))
    r = await client.post("/tokenize", json={"prompt": "hello " * 200_000})
    assert r.status_code == 400 and "characters long" in r.json()["error"]["message"] and not calls
    assert (await client.post("/tokenize", json={"prompt": "hello"})).status_code == 200


async def test_a_chat_of_more_messages_than_the_context_has_tokens_is_refused_before_rendering(client, engine,
                                                                                              monkeypatch):
    """QA: 300,000 empty messages passed the character check and rendered 1.5 M tokens to be refused."""
    rendered = []
    original = engine.apply_chat_template
    monkeypatch.setattr(engine, "apply_chat_template", lambda *a, **k: rendered.append(1) or original(*a, **k))
    many = [{"role": "user", "content": ""}] * (engine.max_model_len + 1)
    for path, body in (("/v1/chat/completions", {"messages": many, "max_tokens": 1}), ("/tokenize", {"messages": many})):
        r = await client.post(path, json=body)
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"] and not rendered, path
    # fewer messages whose rendered text alone is too long: refused after rendering, before tokenizing
    monkeypatch.setattr(engine, "max_token_chars", 1)
    r = await client.post("/tokenize", json={"messages": [{"role": "user", "content": ""}] * engine.max_model_len})
    assert r.status_code == 400 and "characters long" in r.json()["error"]["message"] and rendered


async def test_a_list_of_prompts_is_refused_at_the_first_that_cannot_fit(client, engine, monkeypatch):
    """QA: each prompt of a list passed the character check alone, and all were tokenized (60 of them,
    14 MB: 6-9 s) before the first was refused; now tokenizing stops at the first too long, and
    a list that fits is served."""
    calls = []
    original = engine.tokenize
    monkeypatch.setattr(engine, "tokenize", lambda *a, **k: calls.append(1) or original(*a, **k))
    fits = "hi " * 4
    too_long = "hello " * engine.max_model_len  # under the character bound, over the context in tokens
    r = await client.post("/v1/completions", json={"prompt": [fits, too_long] + [too_long] * 5, "max_tokens": 1})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    assert len(calls) == 2
    ids = engine.tokenize(fits)
    r = await client.post("/v1/completions", json={"prompt": [ids, ids[:-1] + [0] * engine.max_model_len],
                                                   "max_tokens": 1})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    r = await client.post("/v1/completions", json={"prompt": [fits, fits], "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.json()

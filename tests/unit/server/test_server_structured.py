"""Structured output over HTTP: OpenAI's `response_format` and vLLM's `structured_outputs`, in chat and
completions, streamed or not, with n choices; bad schemas, regexes and grammars are 400s."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import jsonschema
import pytest

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "rain"],
          "properties": {"city": {"enum": ["Paris", "Oslo"]}, "rain": {"type": "boolean"}},
          "x-guidance": {"whitespace_flexible": False}}
MESSAGES = [{"role": "user", "content": "Weather?"}]
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}


async def post(client, route: str, status: int = 200, **body):
    r = await client.post(route, json={"max_tokens": 40, "temperature": 0, **body})
    assert r.status_code == status, r.text
    return r.json()


async def test_chat_response_format_json_schema(client):
    for adapter in (None, "a0"):
        body = await post(client, "/v1/chat/completions", messages=MESSAGES, response_format=JSON_SCHEMA_FORMAT,
                          **({"model": adapter} if adapter else {}))
        choice = body["choices"][0]
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
        assert choice["finish_reason"] == "stop"


async def test_completions_take_response_format_and_structured_outputs(client):
    body = await post(client, "/v1/completions", prompt="x", response_format=JSON_SCHEMA_FORMAT)
    jsonschema.validate(json.loads(body["choices"][0]["text"]), SCHEMA)
    cases = [({"regex": "[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
             ({"choice": ["red", "green"]}, lambda t: t in ("red", "green")),
             ({"grammar": 'start: "(" item ("," item)? ")"\nitem: "a" | "b"'},
              lambda t: re.fullmatch(r"\([ab](,[ab])?\)", t)),
             ({"json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None)]
    for structured, ok in cases:
        body = await post(client, "/v1/completions", prompt="x", structured_outputs=structured)
        assert ok(body["choices"][0]["text"]), (structured, body["choices"][0]["text"])


async def test_streamed_and_n_choices_each_follow_the_schema(client):
    r = await client.post("/v1/chat/completions", json={
        "messages": MESSAGES, "max_tokens": 40, "temperature": 1.0, "seed": 4, "n": 3, "stream": True,
        "response_format": JSON_SCHEMA_FORMAT})
    assert r.status_code == 200
    texts = {}
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
    assert sorted(texts) == [0, 1, 2]
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)


async def test_text_response_format_is_free_text(client):
    free = await post(client, "/v1/chat/completions", messages=MESSAGES)
    text = await post(client, "/v1/chat/completions", messages=MESSAGES, response_format={"type": "text"})
    assert text["choices"][0]["message"] == free["choices"][0]["message"]


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     "response_format", "invalid json schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "needs"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", ""),
    ({"structured_outputs": {"regex": "a("}}, "structured_outputs", "invalid regex"),
    ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs", "invalid grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
])
async def test_bad_structured_output_requests_are_400(client, body, param, message):
    for route, extra in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "x"})):
        error = (await post(client, route, 400, **extra, **body))["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param and message in error["message"], error


def slow_compiles(monkeypatch) -> threading.Event:
    """Guides whose text holds "slow-" compile only once the returned gate is set (or after 60 s)."""
    from s2ft_serve.engine.guided import GuidedDecoding

    gate = threading.Event()
    compile_uncached = GuidedDecoding._compile_uncached

    def slow(self, fmt, text):
        if "slow-" in text:
            gate.wait(60)
        return compile_uncached(self, fmt, text)

    monkeypatch.setattr(GuidedDecoding, "_compile_uncached", slow)
    return gate


async def test_slow_new_schemas_do_not_stall_other_requests(client, engine, monkeypatch):
    """QA: schema checks ran in asyncio's default thread pool (6 threads on 2 cores), which also tokenizes
    prompts and queues requests; a handful of schemas that take long to compile (a 6,000-property one took
    15 s to be refused) held every thread, and a plain one-token completion waited 40-75 s."""
    gate = slow_compiles(monkeypatch)
    engine.guided  # built before the requests (its first build runs where the first check runs)
    heavy = [asyncio.ensure_future(client.post("/v1/completions", json={
        "prompt": "x", "max_tokens": 16, "structured_outputs": {"choice": [f"slow-{i}"]}})) for i in range(40)]
    try:
        await asyncio.sleep(0.5)
        plain = await asyncio.wait_for(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}), 30)
        assert plain.status_code == 200 and not any(task.done() for task in heavy)
    finally:
        gate.set()
    for i, answer in enumerate(await asyncio.gather(*heavy)):
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == f"slow-{i}"


async def test_a_flood_of_new_schemas_is_bounded_by_the_queue_limit(client, engine, monkeypatch):
    """Requests waiting for new guides to compile were not counted anywhere (QA: a flood of distinct slow
    schemas queued without bound): beyond `max_queue` of them, a new schema gets a 429 with Retry-After, as
    a full engine queue does; known guides and plain requests are served meanwhile, and nothing is lost."""
    gate = slow_compiles(monkeypatch)
    monkeypatch.setattr(engine.config, "max_queue", 4)  # (schemas new to this test: others' are cached)
    known = {"prompt": "x", "max_tokens": 8, "structured_outputs": {"choice": ["known"]}}
    assert (await client.post("/v1/completions", json=known)).status_code == 200  # compiled once, cached
    heavy = [asyncio.ensure_future(client.post("/v1/completions", json={
        "prompt": "x", "max_tokens": 16, "structured_outputs": {"choice": [f"flood-slow-{i}"]}})) for i in range(4)]
    try:
        await asyncio.sleep(0.5)
        for i in (4, 5):
            r = await client.post("/v1/chat/completions", json={
                "messages": MESSAGES, "max_tokens": 16, "structured_outputs": {"choice": [f"flood-slow-{i}"]}})
            assert r.status_code == 429 and r.headers["retry-after"], r.text
            assert r.json()["error"]["type"] == "rate_limit_error" and "compile" in r.json()["error"]["message"]
        for body in (known, {"prompt": "x", "max_tokens": 1}):
            r = await asyncio.wait_for(client.post("/v1/completions", json=body), 30)
            assert r.status_code == 200, r.text
        assert not any(task.done() for task in heavy)
    finally:
        gate.set()
    for i, answer in enumerate(await asyncio.gather(*heavy)):
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == f"flood-slow-{i}"
    # a request that goes away while its schema compiles leaves the compile counted until it ends; one
    # whose check had not started yet (two threads) is not counted any more: that check never runs
    from s2ft_serve.server.generation import GUIDE_CHECKS

    def slow_request(name: str):
        return asyncio.ensure_future(client.post("/v1/completions", json={
            "prompt": "x", "max_tokens": 16, "structured_outputs": {"choice": [name]}}))

    gate.clear()
    gone = [slow_request(f"flood-slow-gone-{i}") for i in range(4)]
    await asyncio.sleep(0.5)
    for task in gone:
        task.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    await asyncio.sleep(0.1)
    assert GUIDE_CHECKS.pending == 2  # (QA: the two queued ones, never run, stayed counted for good)
    later = [slow_request(f"flood-slow-later-{i}") for i in range(2)]
    try:
        await asyncio.sleep(0.5)
        r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 16,
                                                       "structured_outputs": {"choice": ["flood-slow-7"]}})
        assert r.status_code == 429, r.text
    finally:
        gate.set()
    for i, answer in enumerate(await asyncio.gather(*later)):
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == f"flood-slow-later-{i}"
    await asyncio.sleep(0.5)  # the cancelled requests' running compiles end too
    assert GUIDE_CHECKS.pending == 0
    # new schemas are taken again
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 16,
                                                   "structured_outputs": {"choice": ["flood-slow-6"]}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "flood-slow-6"

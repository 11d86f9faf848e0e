"""`POST /tokenize` and `/detokenize` (vLLM's routes): the same ids generation uses, and back."""

from __future__ import annotations

import pytest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


async def test_tokenize_gives_the_ids_generation_counts(client, engine):
    prompt = "The quick brown fox"
    r = await client.post("/tokenize", json={"model": "a0", "prompt": prompt})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == engine.tokenize(prompt) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == engine.max_model_len
    usage = (await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})).json()["usage"]
    assert usage["prompt_tokens"] == body["count"]
    chat = (await client.post("/tokenize", json={"messages": MESSAGES})).json()
    assert chat["tokens"] == engine.apply_chat_template(MESSAGES)
    chat_usage = (await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})).json()
    assert chat_usage["usage"]["prompt_tokens"] == chat["count"]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
# a chat template that shows the tools, as Qwen's or Llama 3's do
TOOLS_TEMPLATE = ("{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
                  "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")


async def test_tokenize_counts_the_tools_a_chat_shows(client, engine, monkeypatch):
    monkeypatch.setattr(engine.tokenizer, "chat_template", TOOLS_TEMPLATE)
    plain = (await client.post("/tokenize", json={"messages": MESSAGES})).json()
    with_tools = (await client.post("/tokenize", json={"messages": MESSAGES, "tools": TOOLS})).json()
    assert with_tools["count"] > plain["count"]
    assert with_tools["tokens"] == engine.apply_chat_template(MESSAGES, TOOLS)
    usage = (await client.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS,
                                                              "tool_choice": "none", "max_tokens": 1})).json()["usage"]
    assert usage["prompt_tokens"] == with_tools["count"]


async def test_detokenize_inverts_tokenize(client):
    tokens = (await client.post("/tokenize", json={"prompt": "hello world"})).json()["tokens"]
    r = await client.post("/detokenize", json={"tokens": tokens})
    assert r.status_code == 200 and r.json() == {"prompt": "hello world"}


@pytest.mark.parametrize("path, body, status", [
    ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400),
    ("/tokenize", {}, 400),
    ("/tokenize", {"prompt": "x", "tools": TOOLS}, 400),
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404),
    ("/detokenize", {"tokens": [10**9]}, 400),
    ("/detokenize", {"tokens": ["a"]}, 400),
])
async def test_bad_requests_are_refused(client, path, body, status):
    r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}

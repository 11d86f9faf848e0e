"""Requests shaped as OpenAI's and vLLM's clients send them (QA compatibility pass)."""

from __future__ import annotations

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "Hi", "max_tokens": 2}


async def test_an_explicit_null_means_the_default(client):
    """QA: `n: null`, `echo: null`, `stream: null`, `logprobs: null`..., which the openai client's types
    allow and OpenAI and vLLM take as the default, were 400s."""
    nulls = {"n": None, "stream": None, "min_tokens": None, "ignore_eos": None, "skip_special_tokens": None,
             "include_stop_str_in_output": None}
    r = await client.post("/v1/completions", json={**COMPLETION, **nulls, "echo": None, "add_special_tokens": None})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 1 and not body["choices"][0]["text"].startswith("Hi")  # n 1, no echo
    r = await client.post("/v1/chat/completions", json={**CHAT, **nulls, "logprobs": None, "add_generation_prompt": None,
                                                         "continue_final_message": None, "stream_options": None})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None, r.text
    # fields whose type holds None keep their reading of it (completions' max_tokens: OpenAI's default 16)
    r = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": None, "temperature": None,
                                                   "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
    r = await client.post("/v1/completions", json={"prompt": None, "max_tokens": 2})  # a required field stays required
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


async def test_stream_options_need_stream(client):
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        r = await client.post(path, json={**body, "stream_options": {"include_usage": True}})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "stream_options", path
        assert error["message"] == "stream_options: stream_options is only allowed when stream is true"


async def test_openai_bookkeeping_fields_are_accepted(client):
    """QA: SDK wrappers that always send `store` / `metadata` / `service_tier` got 400 unknown field."""
    extra = {"store": False, "metadata": {"run": "eval-3"}, "service_tier": "auto"}
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        assert (await client.post(path, json={**body, **extra})).status_code == 200, path


async def test_error_params_name_fields_not_pydantic_internals(client):
    """QA: `param` read `messages.0.content.str`, `prompt.str`, `tool_choice.literal[...]`, and a byte offset
    (`16`) for a body cut short."""
    r = await client.post("/v1/chat/completions", json={**CHAT, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0.content"), r.text
    assert ".str" not in r.json()["error"]["param"]
    r = await client.post("/v1/completions", json={"prompt": ["a", [1, 2]], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] in ("prompt", "prompt.1"), r.text
    r = await client.post("/v1/chat/completions", json={**CHAT, "tool_choice": {"type": "allowed_tools"}})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("tool_choice")
    assert "literal" not in r.json()["error"]["param"] and "Named" not in r.json()["error"]["param"]
    r = await client.post("/v1/completions", content=b'{"prompt": "Hi",', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None
    assert r.json()["error"]["message"].startswith("the request body is not valid JSON")

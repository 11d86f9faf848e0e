"""Errors in OpenAI's shape: 400 (validation), 404 (unknown adapter/route), 409, 422, 429, 503."""

from __future__ import annotations

import asyncio
import json

import pytest
from server_helpers import client_for, make_server_engine, write_adapter

from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.engine import Engine
from s2ft_serve.server.app import create_app


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "temperature": 3}, "temperature"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "bogus": 1}, "bogus"),
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": "hi", "stop": ["", "x"]}, "stop"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    ({"prompt": [], "max_tokens": 1}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
])
async def test_invalid_completion_parameters_are_400(client, body, param):
    error = error_of(await client.post("/v1/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith(param)


async def test_prompt_plus_max_tokens_beyond_context_is_400(client, engine):
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": engine.max_model_len + 1})
    assert "maximum context length" in error_of(r, 400)["message"]
    long_prompt = [5] * (engine.max_model_len + 1)
    assert "maximum context length" in error_of(await client.post("/v1/completions", json={"prompt": long_prompt}),
                                                 400)["message"]


async def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(client, engine, monkeypatch):
    """QA: a 6 MB prompt was tokenized in full (8-18 s of CPU) before the context check refused it."""
    limit = 2 * engine.max_model_len * engine.max_token_chars
    calls = []
    monkeypatch.setattr(engine.tokenizer, "encode", lambda *a, **k: calls.append(a) or [1])
    monkeypatch.setattr(engine, "apply_chat_template", lambda *a, **k: calls.append(a) or [1])
    for field, body in (("prompt", {"prompt": "a" * (limit + 1)}), ("prompt", {"prompt": ["hi", "a" * (limit + 1)]}),
                        ("messages", {"messages": [{"role": "user", "content": "a" * (limit // 2 + 1)}] * 2})):
        route = "/v1/chat/completions" if field == "messages" else "/v1/completions"
        error = error_of(await client.post(route, json=body), 400)
        assert error["param"] == field and "characters long" in error["message"]
    assert calls == []
    # at the bound itself the text is tokenized and judged by its tokens (here: the stub's one token)
    assert (await client.post("/v1/completions", json={"prompt": "a" * limit, "max_tokens": 1})).status_code == 200
    assert len(calls) == 1


async def test_invalid_json_and_chat_errors_are_400(client):
    r = await client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    error_of(r, 400)
    error_of(await client.post("/v1/chat/completions", json={"messages": []}), 400)
    bad_role = {"messages": [{"role": "wizard", "content": "x"}]}
    error_of(await client.post("/v1/chat/completions", json=bad_role), 400)
    tools = {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}
    assert error_of(await client.post("/v1/chat/completions", json=tools), 400)["param"] == "tools.0.function"


async def test_unknown_adapter_is_404_with_openai_message(client):
    for body in ({"prompt": "hi", "model": "nope"}, {"prompt": "hi", "adapter": "nope"}):
        error = error_of(await client.post("/v1/completions", json=body), 404)
        assert error["message"] == "The model 'nope' does not exist."
        assert error["code"] == "model_not_found"
    chat = {"messages": [{"role": "user", "content": "x"}], "model": "nope"}
    assert error_of(await client.post("/v1/chat/completions", json=chat), 404)["message"] == \
        "The model 'nope' does not exist."
    assert error_of(await client.get("/v1/models/nope"), 404)["message"] == "The model 'nope' does not exist."


async def test_model_and_adapter_naming_different_adapters_is_400(client):
    error = error_of(await client.post("/v1/completions", json={"prompt": "hi", "model": "a0", "adapter": "a1"}), 400)
    assert error["param"] == "adapter"


async def test_lone_surrogates_are_400(client):
    """Text with a lone surrogate (valid JSON, `"\\ud800"`, but no Unicode string a tokenizer takes) is a
    400 naming the field, not a 500."""
    bad = "a \ud800 b"

    def post(route, body):  # json.dumps escapes the surrogate as JSON allows; httpx's encoder would refuse it
        return client.post(route, content=json.dumps(body), headers={"content-type": "application/json"})

    assert error_of(await post("/v1/completions", {"prompt": bad, "max_tokens": 2}), 400)["param"] == "prompt"
    chat = {"messages": [{"role": "user", "content": bad}], "max_tokens": 2}
    assert error_of(await post("/v1/chat/completions", chat), 400)["param"] == "messages"
    assert error_of(await post("/tokenize", {"prompt": bad}), 400)["param"] == "prompt"
    assert (await client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2})).status_code == 200


async def test_lone_surrogates_in_names_are_not_500(client, engine):
    """QA: JSON's "\\udcff" escape is a string UTF-8 cannot encode: an error naming such a model, or an adapter
    whose config held one, made the response itself fail (500, and every adapter listing after it)."""
    headers = {"content-type": "application/json"}
    for path, body in (("/v1/completions", b'{"model": "\\udcff", "prompt": "hi", "max_tokens": 1}'),
                       ("/v1/chat/completions", b'{"model": "x\\ud800", "messages": [{"role": "user", "content": "x"}]}')):
        r = await client.post(path, content=body, headers=headers)
        assert r.status_code == 404 and json.loads(r.text)["error"]["code"] == "model_not_found", r.text
    from s2ft_serve.adapters.format import Adapter
    from s2ft_serve.errors import InvalidRequestError

    adapter = next(iter(engine.registry.entries.values())).version.adapter
    with pytest.raises(InvalidRequestError, match="valid Unicode text"):
        engine.add_adapter("bad\udcff", Adapter(adapter.config, adapter.modules))
    assert (await client.get("/v1/adapters")).status_code == 200


async def test_names_and_paths_too_long_for_the_file_system_are_not_500(client):
    """A 300-character adapter name or path (the file system's limit is 255 per name): an unknown model
    is 404, an unusable adapter path 422 or 400, never a 500."""
    long = "x" * 300
    error = error_of(await client.post("/v1/completions", json={"prompt": "hi", "model": long}), 404)
    assert error["code"] == "model_not_found"
    chat = {"messages": [{"role": "user", "content": "x"}], "model": long}
    error_of(await client.post("/v1/chat/completions", json=chat), 404)
    error_of(await client.post("/tokenize", json={"prompt": "hi", "model": long}), 404)
    error_of(await client.post(f"/v1/adapters/{long}/fuse"), 404)
    r = await client.post("/v1/adapters", json={"name": "long-path", "path": long})
    assert r.status_code in (400, 422) and "not a usable path" in r.json()["error"]["message"], r.text
    error_of(await client.post("/v1/adapters", json={"name": long, "path": "a0"}), 400)


async def test_unknown_route_is_404_in_openai_shape(client):
    error_of(await client.get("/v1/nothing-here"), 404)
    error_of(await client.get("/v1/completions"), 405)


async def test_duplicate_load_is_409_and_bad_folder_is_422(client, adapter_root):
    error = error_of(await client.post("/v1/adapters", json={"name": "a0", "path": "a1"}), 409)
    assert "a0" in error["message"]
    broken = adapter_root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text('{"adapter_type": "s2ft", "format_version": 1}')
    error = error_of(await client.post("/v1/adapters", json={"name": "broken", "path": "broken"}), 422)
    assert "broken" in error["message"] or "adapter_model.safetensors" in error["message"]
    r = await client.post("/v1/completions", json={"prompt": "hi", "model": "a0", "max_tokens": 2})
    assert r.status_code == 200  # a bad adapter disturbs nothing


async def test_not_ready_is_503_but_health_answers(settings):
    async with client_for(create_app(settings)) as c:  # no engine, lifespan not run: still loading
        assert (await c.get("/health")).status_code == 200
        assert error_of(await c.get("/ready"), 503)["type"] == "service_unavailable"
        error_of(await c.post("/v1/completions", json={"prompt": "hi"}), 503)
        error_of(await c.get("/v1/models"), 503)
        assert (await c.get("/metrics")).status_code == 200


async def test_queue_full_is_429_with_retry_after(settings, tiny_llama_dir, adapter_root):
    """Queue of 2 and an engine not stepping yet, one sequence waiting: a request with n = 2 does not fit
    now, so it gets 429; one with n = 3 never could (400); once the engine runs, the queue drains."""
    from s2ft_serve.engine.request import SamplingParams

    engine = Engine(EngineConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu",
                                 adapter_root=str(adapter_root), max_batch_size=1, max_queue=2))
    try:
        async with client_for(create_app(settings, engine)) as c:
            waiting = engine.submit("hi", None, SamplingParams(max_tokens=2))
            body = {"prompt": "hi", "n": 2, "max_tokens": 200, "ignore_eos": True}
            r = await c.post("/v1/completions", json=body)
            error = error_of(r, 429)
            assert error["type"] == "rate_limit_error"
            assert int(r.headers["retry-after"]) >= 1
            assert "queue holds (2)" in error_of(await c.post("/v1/completions", json={**body, "n": 3}), 400)["message"]
            engine.start()
            assert waiting.result(timeout=30).finish_reason == "length"
            for _ in range(100):  # the cancelled choices leave the queue at the engine's next step
                ok = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                if ok.status_code != 429:
                    break
                await asyncio.sleep(0.05)
            assert ok.status_code == 200
    finally:
        engine.shutdown(timeout=5)


async def test_an_adapter_named_beyond_latin1_is_served(settings, tiny_llama_dir, adapter_root):
    """QA: the `x-adapter-id` header cannot hold 日本: every request for such an adapter was a 500."""
    from urllib.parse import unquote

    from s2ft_serve.model.testing import random_adapter

    engine = Engine(EngineConfig(model=str(tiny_llama_dir), device="cpu", max_batch_size=2)).start()
    try:
        engine.add_adapter("日本", random_adapter(engine.loaded.model, engine.model_name, seed=3))
        async with client_for(create_app(settings, engine)) as client:
            for stream in (False, True):
                r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "model": "日本",
                                                               "stream": stream})
                assert r.status_code == 200 and unquote(r.headers["x-adapter-id"]) == "日本", r.text
    finally:
        engine.shutdown(timeout=5)


async def test_adapter_names_with_control_characters_are_refused_and_any_held_name_is_reachable(
        settings, tiny_llama_dir, tmp_path):
    """QA: a folder named with a newline or a carriage return was loaded on demand and served, then its
    `x-adapter-id` header made uvicorn drop the connection (counted a 200); a folder named with a space
    was served but refused, by the admin routes' name rule, as a merge source and by vLLM's unload."""
    from s2ft_serve.errors import InvalidRequestError

    engine = make_server_engine(tiny_llama_dir, tmp_path, max_batch_size=2)
    try:
        for name, seed in (("nl\nx", 1), ("cr\rx", 2), ("c\x01x", 3), ("sp ace", 4)):
            write_adapter(engine, tmp_path / name, seed)
        with pytest.raises(InvalidRequestError, match="control characters"):
            engine.load_adapter("a\nb", str(tmp_path / "sp ace"))
        async with client_for(create_app(settings.model_copy(update={"adapter_root": str(tmp_path)}), engine)) as c:
            for name in ("nl\nx", "cr\rx", "c\x01x"):
                r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "model": name})
                assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "model": "sp ace"})
            assert r.status_code == 200 and r.headers["x-adapter-id"] == "sp ace"
            r = await c.post("/v1/adapters/merge", json={"name": "m", "sources": [{"name": "sp ace", "weight": 0.5}]})
            assert r.status_code in (200, 201), r.text
            assert (await c.post("/v1/unload_lora_adapter", json={"lora_name": "sp ace"})).status_code == 200
            assert [a.name for a in engine.list_adapters()] == ["m"]
    finally:
        engine.shutdown(timeout=5)


def test_a_stream_chunk_with_a_lone_surrogate_is_escaped_not_an_error():
    """QA: a model writing JSON's "\\udddd" escape inside a streamed tool call ended the stream in an internal
    error (the chunk could not be encoded as UTF-8)."""
    from pydantic import BaseModel

    from s2ft_serve.server.generation import sse

    class Chunk(BaseModel):
        text: str

    assert sse(Chunk(text="ok é")) == 'data: {"text":"ok é"}\n\n'
    line = sse(Chunk(text="x\udddd"))
    assert line.startswith("data: ") and json.loads(line[6:]) == {"text": "x\udddd"}
    line.encode("utf-8")


async def test_an_unexpected_error_is_answered_and_goes_no_further(settings, engine):
    """QA: Starlette's handler re-raised after the 500, so uvicorn logged it twice and reset the client's
    keep-alive connection (the in-process transport raised it into the client here)."""
    app = create_app(settings, engine)

    async def broken():
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    async with client_for(app) as client:
        error = error_of(await client.get("/broken"), 500)
        assert error["type"] == "internal_error" and "RuntimeError" in error["message"]
        assert (await client.get("/health")).status_code == 200

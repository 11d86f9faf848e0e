"""`s2ft-serve` as a real process on a loopback port, driven by the official `openai` client.

Covers completions, chat, streaming, adapters by `adapter` and by `model`, the admin API, auth,
every error class, lazy loading, eviction and reload, replace under load, concurrent mixed-adapter
requests against sequential ones, and a SIGTERM that drains and exits 0.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import openai
import pydantic
import pytest

from s2ft_serve.adapters.format import save_adapter
from s2ft_serve.model.loading import load_model
from s2ft_serve.model.testing import random_adapter

USER_KEY, ADMIN_KEY = "sk-user", "sk-admin"
PROMPTS = ["The quick brown fox", "Hello world", "What is 2 + 2?", "Structured sparse"]
DISK = {"a0": 1, "a1": 2, "a2": 3, "a3": 4, "a4": 5, "lazy1": 6, "swap-old": 7, "swap-new": 8}


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, root: Path, log: Path, *flags: str) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "s2ft_serve.server.cli", "--model", str(model_dir), "--adapter-root", str(root),
           "--port", str(port), "--device", "cpu", "--no-access-log", *flags]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"s2ft-serve exited with {proc.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"s2ft-serve was not ready within 120 s:\n{server.output()}")


def stop_server(server: Server) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        return server.proc.wait()


@pytest.fixture(scope="module")
def adapter_root(tiny_llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("server-adapters")
    loaded = load_model(tiny_llama_dir)
    for name, seed in DISK.items():
        save_adapter(random_adapter(loaded.model, loaded.name, seed=seed, channels=8, scale=0.08), root / name)
    return root


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapter_root, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-log") / "s2ft-serve.log"
    s = start_server(tiny_llama_dir, adapter_root, log, "--api-key", USER_KEY, "--admin-key", ADMIN_KEY,
                     "--adapter", f"a0={adapter_root / 'a0'}", "--adapter", f"a1={adapter_root / 'a1'}",
                     "--max-resident-adapters", "3", "--max-batch-size", "8", "--tool-call-parser", "hermes",
                     "--reasoning-parser", "qwen3")
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def base(tiny_llama_dir) -> str:
    return str(tiny_llama_dir)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=USER_KEY, max_retries=0, timeout=120)


@pytest.fixture
def admin(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as c:
        yield c


def greedy(client: openai.OpenAI, model: str, prompt: str = PROMPTS[0], max_tokens: int = 12, **extra) -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body=extra or None)
    return out.choices[0].text


def test_startup_log_names_model_adapters_and_url(server, base):
    out = server.output()
    assert f"model {base}" in out and "device cpu" in out and "dtype float32" in out
    assert "adapters a0=" in out and server.url in out


def test_completions_by_model_and_by_adapter_field(client, base):
    raw = client.completions.with_raw_response.create(model="a0", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    by_model = raw.parse()
    assert raw.headers["x-adapter-id"] == "a0" and by_model.model == "a0"
    assert by_model.usage.prompt_tokens > 0 and by_model.usage.completion_tokens > 0
    by_field = client.completions.create(model=base, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                         extra_body={"adapter": "a0"})
    assert by_field.model == "a0" and by_field.choices[0].text == by_model.choices[0].text
    assert greedy(client, base) != by_model.choices[0].text != greedy(client, "a1")


def test_chat_completions(client, base):
    raw = client.chat.completions.with_raw_response.create(
        model="a1", messages=[{"role": "user", "content": "Say hello."}], max_tokens=10, temperature=0)
    chat = raw.parse()
    assert chat.model == "a1" and raw.headers["x-adapter-id"] == "a1"
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    assert chat.usage.completion_tokens == 10 or chat.choices[0].finish_reason == "stop"
    base_chat = client.chat.completions.create(model=base, messages=[{"role": "user", "content": "Say hello."}],
                                               max_tokens=10, temperature=0)
    assert base_chat.model == base


def test_penalties_and_logit_bias_through_the_official_client(client):
    """OpenAI's logit_bias forces a token in completions and chat; penalties change a greedy answer
    and are refused out of range."""
    forced = client.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=1,
                                       logit_bias={"42": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].logprobs.tokens == [forced.choices[0].logprobs.tokens[0]] * 4
    plain = client.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=1,
                                      extra_body={"ignore_eos": True})
    assert forced.choices[0].text != plain.choices[0].text
    chat = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logit_bias={"42": 100})
    assert chat.choices[0].message.content == forced.choices[0].logprobs.tokens[0] * 3
    penalised = client.completions.create(model="a1", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0, extra_body={"ignore_eos": True})
    assert penalised.choices[0].text != greedy(client, "a1", max_tokens=24, ignore_eos=True)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.completions.create(model="a1", prompt="x", max_tokens=2, frequency_penalty=2.5)


class Weather(pydantic.BaseModel):
    # rigid whitespace (llguidance's schema option) so that even the tiny random model ends the object
    model_config = pydantic.ConfigDict(json_schema_extra={"x-guidance": {"whitespace_flexible": False}})
    city: Literal["Paris", "Oslo"]
    rain: bool


def test_structured_output_through_the_official_client(client):
    """`chat.completions.parse` sends a strict json_schema response_format and parses the answer into
    the pydantic model; vLLM's `structured_outputs` goes through `extra_body`; a bad regex is a 400."""
    for model in ("a0", "a1"):
        parsed = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "Weather?"}],
                                               response_format=Weather, max_tokens=30, temperature=0)
        weather = parsed.choices[0].message.parsed
        assert isinstance(weather, Weather) and parsed.choices[0].finish_reason == "stop"
    out = client.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                    extra_body={"structured_outputs": {"regex": "[0-9]{4}-[0-9]{2}"}})
    assert re.fullmatch("[0-9]{4}-[0-9]{2}", out.choices[0].text)
    with pytest.raises(openai.BadRequestError, match="invalid regex"):
        client.completions.create(model="a0", prompt="x", max_tokens=2,
                                  extra_body={"structured_outputs": {"regex": "(("}})


class GetWeather(pydantic.BaseModel):
    """The weather in a city."""

    city: Literal["Paris", "Oslo"]
    unit: Literal["celsius", "fahrenheit"]


def test_function_calling_through_the_official_client(client):
    """A named tool_choice and "required" answer with tool calls; `parse` reads their arguments into the
    pydantic model of `pydantic_function_tool`; with the default tool_choice ("auto") the server's
    `hermes` parser reads the calls the model writes, streamed or not."""
    tool = openai.pydantic_function_tool(GetWeather)
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    parsed = client.chat.completions.parse(
        model="a0", messages=messages, tools=[tool], max_tokens=160, temperature=0,
        tool_choice={"type": "function", "function": {"name": "GetWeather"}})
    message = parsed.choices[0].message
    assert message.content is None and parsed.choices[0].finish_reason == "stop"
    assert isinstance(message.tool_calls[0].function.parsed_arguments, GetWeather)
    out = client.chat.completions.create(model="a1", messages=messages, tools=[tool], tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=160, temperature=0)
    assert out.choices[0].finish_reason == "tool_calls"
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "GetWeather" and GetWeather.model_validate_json(call.function.arguments)
    said = '<tool_call>{"name": "GetWeather", "arguments": {"city": "Oslo", "unit": "celsius"}}</tool_call>'
    auto = dict(model="a1", messages=messages, tools=[tool], max_tokens=200, temperature=0,
                extra_body={"structured_outputs": {"choice": [said]}})  # the tiny model writes `said`
    parsed = client.chat.completions.parse(**auto)
    assert parsed.choices[0].finish_reason == "tool_calls" and parsed.choices[0].message.content is None
    (call,) = parsed.choices[0].message.tool_calls
    assert call.function.parsed_arguments == GetWeather(city="Oslo", unit="celsius")
    with client.chat.completions.stream(**auto) as events:
        final = events.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert [c.function.parsed_arguments for c in final.choices[0].message.tool_calls] == [call.function.parsed_arguments]


def test_reasoning_through_the_official_client(client):
    """The qwen3 reasoning parser: `reasoning_content` reaches the official client (an extra field of its
    message and delta models), apart from the answer, streamed or not."""
    said = "<think>Two and two.</think>\n\nFour."
    body = dict(model="a0", messages=[{"role": "user", "content": "2 + 2?"}], max_tokens=120, temperature=0,
                extra_body={"structured_outputs": {"choice": [said]}})  # the tiny model writes `said`
    message = client.chat.completions.create(**body).choices[0].message
    assert message.content == "Four." and message.model_extra["reasoning_content"] == "Two and two."
    chunks = [c for c in client.chat.completions.create(**body, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks) == "Two and two."
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Four."


def test_streaming_equals_non_streaming(client):
    whole = greedy(client, "a1", max_tokens=16)
    stream = client.completions.create(model="a1", prompt=PROMPTS[0], max_tokens=16, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == whole
    messages = [{"role": "user", "content": "Count to three."}]
    chat = client.chat.completions.create(model="a0", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="a0", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_models_list_has_base_and_adapters_with_parent(client, base):
    models = {m.id: m.to_dict() for m in client.models.list()}
    assert base in models and models[base].get("parent") is None
    assert models["a0"]["parent"] == base and models["a1"]["parent"] == base


def test_auth(server, client):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    r = httpx.get(f"{server.url}/v1/adapters", headers={"Authorization": f"Bearer {USER_KEY}"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert httpx.get(f"{server.url}/v1/adapters").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_error_classes(client, admin, adapter_root, base):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=base, prompt="x", max_tokens=10**6)
    assert "maximum context length" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=base, prompt="x", extra_body={"bogus": 1})
    assert err.value.body["param"] == "bogus"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="x")
    assert err.value.body["message"] == "The model 'nope' does not exist."
    r = admin.post("/v1/adapters", json={"name": "a0", "path": "a2"})
    assert r.status_code == 409 and r.json()["error"]["type"] == "conflict_error"
    (adapter_root / "broken").mkdir(exist_ok=True)
    (adapter_root / "broken" / "adapter_config.json").write_text('{"adapter_type": "s2ft", "format_version": 1}')
    r = admin.post("/v1/adapters", json={"name": "broken", "path": "broken"})
    assert r.status_code == 422 and r.json()["error"]["message"]
    assert admin.post("/v1/adapters", json={"name": "out", "path": "/etc"}).status_code == 403
    assert greedy(client, "a0")  # nothing disturbed


def test_admin_routes_and_vllm_aliases(client, admin, base):
    r = admin.post("/v1/adapters", json={"name": "adm", "path": "a2"})
    assert r.status_code == 201 and r.json()["id"] == "adm"
    assert greedy(client, "adm") == greedy(client, "a2")
    card = admin.get("/v1/adapters/adm").json()
    assert card["requests_served"] >= 1 and card["modules"] > 0 and card["per_layer"]
    assert "adm" in {a["id"] for a in admin.get("/v1/adapters").json()["data"]}
    before = {m: greedy(client, m) for m in ("adm", "a1", base)}
    assert admin.post("/v1/adapters/adm/fuse").json()["fused"] is True
    assert {m: greedy(client, m) for m in before} == before
    assert admin.post("/v1/adapters/adm/unfuse").json()["fused"] is False
    merged = admin.post("/v1/adapters/merge", json={"name": "mix", "sources": [{"name": "a0", "weight": 0.5},
                                                                                {"name": "adm", "weight": 0.5}]})
    assert merged.status_code == 201 and greedy(client, "mix")
    assert admin.delete("/v1/adapters/adm").status_code == 200
    with pytest.raises(openai.NotFoundError):
        greedy(client, "adm")
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": "a3"})
    assert r.status_code == 200 and greedy(client, "vl") == greedy(client, "a3")
    assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "vl"}).status_code == 200
    assert admin.delete("/v1/adapters/mix").status_code == 200


def test_prefix_cache_reports_cached_tokens_counts_them_and_resets(server, client, admin, base):
    """A chat whose history is sent again reuses its cached prefix: the same answer, `cached_tokens` in
    usage (non-streamed and streamed), the Prometheus counters, and `/reset_prefix_cache` (admin only)."""
    story = " ".join(["the long shared system prompt that every turn of this conversation sends again"] * 4)
    messages = [{"role": "system", "content": story}, {"role": "user", "content": "Say hello."}]
    admin.post("/reset_prefix_cache").raise_for_status()
    first = client.chat.completions.create(model="a1", messages=messages, max_tokens=8, temperature=0)
    second = client.chat.completions.create(model="a1", messages=messages, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens and cached % 16 == 0
    assert second.choices[0].message.content == first.choices[0].message.content
    chunks = list(client.chat.completions.create(model="a1", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
    other = client.chat.completions.create(model="a0", messages=messages, max_tokens=8, temperature=0)
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # another adapter: its own prefixes
    metrics = httpx.get(f"{server.url}/metrics").text
    hits = next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("s2ft_prefix_cache_hit_tokens_total"))
    assert hits >= 2 * cached
    assert httpx.post(f"{server.url}/reset_prefix_cache", headers={"Authorization": f"Bearer {USER_KEY}"}
                      ).status_code == 403
    assert admin.post("/reset_prefix_cache").status_code == 200
    again = client.chat.completions.create(model="a1", messages=messages, max_tokens=8, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == first.choices[0].message.content


def test_lazy_loading(client, admin):
    assert "lazy1" not in {a["id"] for a in admin.get("/v1/adapters").json()["data"]}
    text = greedy(client, "lazy1")
    assert "lazy1" in {m.id for m in client.models.list()}
    assert greedy(client, "lazy1") == text


def test_eviction_and_transparent_reload(client, admin):
    names = ["a0", "a1", "a2", "a3", "a4"]
    first = {n: greedy(client, n) for n in names}  # five adapters through three resident slots
    cards = admin.get("/v1/adapters").json()["data"]
    assert sum(c["resident"] for c in cards) <= 3
    assert any(not c["resident"] for c in cards if c["id"] in names)
    assert {n: greedy(client, n) for n in names} == first  # evicted ones reload on their next request


def test_concurrent_mixed_adapters_match_sequential(client, base):
    jobs = [(model, prompt) for model in (base, "a0", "a1") for prompt in PROMPTS]
    sequential = [greedy(client, m, p, max_tokens=20) for m, p in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        concurrent_texts = list(pool.map(lambda job: greedy(client, job[0], job[1], max_tokens=20), jobs))
    assert concurrent_texts == sequential


def test_replace_under_load(client, admin):
    assert admin.post("/v1/adapters", json={"name": "ref-old", "path": "swap-old"}).status_code == 201
    assert admin.post("/v1/adapters", json={"name": "ref-new", "path": "swap-new"}).status_code == 201
    old = greedy(client, "ref-old", max_tokens=300, ignore_eos=True)
    new = greedy(client, "ref-new", max_tokens=300, ignore_eos=True)
    assert old != new
    assert admin.post("/v1/adapters", json={"name": "swap", "path": "swap-old"}).status_code == 201
    stream = client.completions.create(model="swap", prompt=PROMPTS[0], max_tokens=300, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    pieces = [next(iter(stream)).choices[0].text]  # in flight on the old weights
    r = admin.post("/v1/adapters", json={"name": "swap", "path": "swap-new", "replace": True})
    assert r.status_code == 201
    pieces += [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert "".join(pieces) == old
    assert greedy(client, "swap", max_tokens=300, ignore_eos=True) == new


def test_unload_under_load(client, admin):
    assert admin.post("/v1/adapters", json={"name": "gone", "path": "a4"}).status_code == 201
    expected = greedy(client, "gone", max_tokens=300, ignore_eos=True)
    stream = client.completions.create(model="gone", prompt=PROMPTS[0], max_tokens=300, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    pieces = [next(iter(stream)).choices[0].text]
    assert admin.delete("/v1/adapters/gone").status_code == 200
    pieces += [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert "".join(pieces) == expected  # the request in flight finished on its weights
    with pytest.raises(openai.NotFoundError):
        greedy(client, "gone")


def metric_value(url: str, line_prefix: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_client_disconnect_cancels_the_stream(server, client):
    closed = 's2ft_requests_total{adapter="a2",status="499"}'
    finished = 's2ft_requests_total{adapter="a2",status="200"}'
    for _ in range(3):  # on a loaded machine the tiny model may send all 400 tokens before the client hangs up
        before, done_before = metric_value(server.url, closed), metric_value(server.url, finished)
        stream = client.completions.create(model="a2", prompt=PROMPTS[1], max_tokens=400, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        stream.close()  # hang up after the first chunk
        for _ in range(200):
            if (metric_value(server.url, closed) > before or metric_value(server.url, finished) > done_before) \
                    and metric_value(server.url, "s2ft_running_requests") == 0:
                break
            time.sleep(0.05)
        if metric_value(server.url, finished) == done_before:
            break
    assert metric_value(server.url, closed) == before + 1  # seen as a client that went away, not a 200
    assert metric_value(server.url, "s2ft_running_requests") == 0  # and the engine dropped the request


@pytest.fixture(scope="module")
def small_server(tiny_llama_dir, adapter_root, tmp_path_factory):
    log = tmp_path_factory.mktemp("small-server-log") / "s2ft-serve.log"
    s = start_server(tiny_llama_dir, adapter_root, log, "--max-queue", "1", "--max-batch-size", "1",
                     "--drain-timeout-s", "60")
    yield s
    stop_server(s)


def test_queue_full_is_429_with_retry_after(small_server, base):
    """Batch size 1 and queue 1: while a long stream runs and a second stream waits in the queue, a third
    request is refused with 429 (a request of n = 2 could never fit: 400)."""
    client = openai.OpenAI(base_url=f"{small_server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="more than the request queue holds"):
        client.completions.create(model=base, prompt="hi", n=2, max_tokens=2)
    refused = None
    for _ in range(10):  # the tiny model may finish a 500-token stream before the next request lands: retry
        running = client.completions.create(model=base, prompt="hi", max_tokens=500, stream=True,
                                            extra_body={"ignore_eos": True})
        assert next(iter(running)).choices  # the stream holds the batch's only place
        waiting = client.completions.create(model=base, prompt="hi", max_tokens=2, stream=True)  # queued
        try:
            client.completions.create(model=base, prompt="hi", max_tokens=2)
        except openai.RateLimitError as exc:
            refused = exc
        finally:
            running.close()  # hang up: the engine drops both streams
            waiting.close()
        if refused is not None:
            break
    assert refused is not None, "a request beyond the queue was never refused"
    assert int(refused.response.headers["retry-after"]) >= 1
    for _ in range(100):  # the cancelled streams leave the batch and the queue at the engine's next steps
        try:
            assert client.completions.create(model=base, prompt="hi", max_tokens=2).choices
            break
        except openai.RateLimitError:
            time.sleep(0.05)
    else:
        pytest.fail("the queue never drained after a refused request")


def test_sigterm_drains_in_flight_requests_and_exits_0(small_server, base):
    client = openai.OpenAI(base_url=f"{small_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.completions.create(model=base, prompt="hi", max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    small_server.proc.send_signal(signal.SIGTERM)
    rest = [c for c in chunks if c.choices]
    assert rest[-1].choices[0].finish_reason == "length"  # the in-flight request finished
    assert small_server.proc.wait(timeout=60) == 0
    assert first.choices and "draining" in small_server.output()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{small_server.url}/health", timeout=2)


def test_requests_still_running_at_the_drain_deadline_end_with_an_error(tiny_llama_dir, adapter_root, tmp_path):
    """QA: at the drain timeout uvicorn cut the connections: a stream ended without an error event or
    `data: [DONE]` (a broken chunked read) and the log had a traceback per request."""
    server = start_server(tiny_llama_dir, adapter_root, tmp_path / "s2ft-serve.log", "--drain-timeout-s", "0",
                          "--max-batch-size", "4")
    body = {"model": str(tiny_llama_dir), "prompt": "hi", "max_tokens": 500, "temperature": 0, "ignore_eos": True}
    plain: list[httpx.Response] = []
    waiter = threading.Thread(target=lambda: plain.append(
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)))
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        waiter.start()
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        events = [line[6:] for line in lines if line.startswith("data: ")]
    waiter.join(timeout=60)
    assert json.loads(first[6:])["choices"]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
    assert plain and plain[0].status_code == 503 and plain[0].json()["error"]["code"] == "shutting_down"
    assert server.proc.wait(timeout=30) == 0
    assert "Exception in ASGI application" not in server.output()


def test_unusable_model_exits_1_with_a_clear_message(tmp_path):
    cmd = [sys.executable, "-m", "s2ft_serve.server.cli", "--model", str(tmp_path / "missing"),
           "--port", str(free_port()), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 1
    assert "startup failed" in proc.stderr and "missing" in proc.stderr

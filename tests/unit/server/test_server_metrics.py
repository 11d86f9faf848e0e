"""`/metrics`: Prometheus text with request counts, latency histograms, tokens, batch sizes, adapter gauges."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from server_helpers import client_for, make_server_engine, write_adapter

from s2ft_serve.server.app import create_app


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of every sample."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(all_samples: dict, name: str, **labels) -> float:
    return all_samples.get((name, frozenset(labels.items())), 0.0)


async def test_requests_tokens_and_latencies_are_counted(client):
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "model": "a1", "n": 2}
    answer = await client.post("/v1/completions", json=body)
    assert answer.status_code == 200
    assert (await client.post("/v1/completions", json={"prompt": "x", "model": "missing"})).status_code == 404
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = samples(r.text)
    assert value(s, "s2ft_requests_total", adapter="a1", status="200") == 1
    assert value(s, "s2ft_requests_total", adapter="<unknown>", status="404") == 1
    assert value(s, "s2ft_generation_tokens_total", adapter="a1") == 8
    # QA: the prompt was counted once per choice (n x usage.prompt_tokens), and each histogram had n
    # observations per HTTP request; the n choices share one prefill and one request
    assert value(s, "s2ft_prompt_tokens_total", adapter="a1") == answer.json()["usage"]["prompt_tokens"] > 0
    for histogram in ("s2ft_time_to_first_token_seconds", "s2ft_e2e_request_latency_seconds"):
        assert value(s, f"{histogram}_count", adapter="a1") == 1
    assert value(s, "s2ft_time_per_output_token_seconds_count", adapter="a1") == 2  # per choice
    assert value(s, "s2ft_batch_size_count") > 0


async def test_unknown_names_and_early_refusals_are_counted_without_client_made_labels(client):
    """QA: a request naming no model that exists but failing another check first (context length, an
    empty stop string) got a 400 and a metric series under the client's name: unbounded labels.
    Requests refused by body validation or the API key were not counted at all."""
    before = samples((await client.get("/metrics")).text)
    for name in ("made-up-1", "made-up-2"):
        r = await client.post("/v1/completions", json={"prompt": "x", "model": name, "max_tokens": 10**6})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await client.post("/v1/chat/completions", json={"model": name, "stop": [""],
                                                            "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404
    assert (await client.post("/v1/completions", json={"prompt": "x", "temperature": -5})).status_code == 400
    assert (await client.post("/v1/completions", json={"prompt": "x", "model": "a1", "stop": [""]})).status_code == 400
    s = samples((await client.get("/metrics")).text)
    assert not any("made-up" in str(labels) for _, labels in s)
    assert value(s, "s2ft_requests_total", adapter="<unknown>", status="404") - \
        value(before, "s2ft_requests_total", adapter="<unknown>", status="404") == 4
    assert value(s, "s2ft_requests_total", adapter="<unknown>", status="400") - \
        value(before, "s2ft_requests_total", adapter="<unknown>", status="400") == 1
    assert value(s, "s2ft_requests_total", adapter="a1", status="400") - \
        value(before, "s2ft_requests_total", adapter="a1", status="400") == 1


async def test_a_model_and_adapter_that_disagree_are_counted_as_unknown(client):
    """QA: counted under the base's label, though the request named no base model."""
    before = samples((await client.get("/metrics")).text)
    r = await client.post("/v1/completions", json={"prompt": "x", "model": "a0", "adapter": "a1"})
    assert r.status_code == 400
    s = samples((await client.get("/metrics")).text)
    for label, added in (("<unknown>", 1), ("", 0)):
        assert value(s, "s2ft_requests_total", adapter=label, status="400") - \
            value(before, "s2ft_requests_total", adapter=label, status="400") == added


async def test_a_response_that_fails_to_build_is_counted_as_500(client, monkeypatch):
    """QA: the request was counted as a 200 before its body was built."""
    from s2ft_serve.server.routes import completions

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(completions, "build_response", broken)
    before = samples((await client.get("/metrics")).text)
    r = await client.post("/v1/completions", json={"prompt": "x", "model": "a0", "max_tokens": 2})
    assert r.status_code == 500
    s = samples((await client.get("/metrics")).text)
    for status, added in (("500", 1), ("200", 0)):
        assert value(s, "s2ft_requests_total", adapter="a0", status=status) - \
            value(before, "s2ft_requests_total", adapter="a0", status=status) == added


async def test_auto_fuse_decisions_are_a_counter(client):
    families = {f.name: f.type for f in text_string_to_metric_families((await client.get("/metrics")).text)}
    assert families["s2ft_auto_fuse_decisions"] == "counter"


async def test_requests_refused_for_the_api_key_are_counted(settings, engine):
    app = create_app(settings.model_copy(update={"api_key": "sk-user"}), engine)
    async with client_for(app) as client:
        assert (await client.post("/v1/completions", json={"prompt": "x"})).status_code == 401
        s = samples((await client.get("/metrics")).text)
    assert value(s, "s2ft_requests_total", adapter="<unknown>", status="401") == 1


async def test_adapter_gauges_and_vllm_lora_info(client, engine):
    s = samples((await client.get("/metrics")).text)
    stats = engine.stats()
    assert value(s, "s2ft_resident_adapters") == stats.resident_adapters >= 2
    assert value(s, "s2ft_queue_depth") == 0
    lora = [(dict(labels), v) for (name, labels), v in s.items() if name == "vllm:lora_requests_info"]
    assert len(lora) == 1
    labels, stamp = lora[0]
    assert labels == {"running_lora_adapters": "", "waiting_lora_adapters": "",
                      "max_lora": str(engine.config.max_resident_adapters)}
    assert stamp > 1e9  # a timestamp, as vLLM sets it
    assert value(s, "vllm:num_requests_waiting") == 0


async def test_admin_load_latency_is_observed(client, engine, adapter_root):
    write_adapter(engine, adapter_root / "metric-dir", seed=71)
    assert (await client.post("/v1/adapters", json={"name": "metric-a", "path": "metric-dir"})).status_code == 201
    s = samples((await client.get("/metrics")).text)
    assert value(s, "s2ft_adapter_load_seconds_count") == 1
    assert (await client.delete("/v1/adapters/metric-a")).status_code == 200


async def test_process_memory_is_exported(client):
    s = samples((await client.get("/metrics")).text)
    assert value(s, "process_resident_memory_bytes") > 10 * 2**20


async def test_speculative_decoding_counts_drafts(tiny_llama_dir, adapter_root, settings):
    engine = make_server_engine(tiny_llama_dir, adapter_root, speculative_tokens=4)
    try:
        async with client_for(create_app(settings, engine)) as client:
            body = {"prompt": "xyz", "max_tokens": 24, "temperature": 0, "ignore_eos": True, "logit_bias": {"5": 100}}
            assert (await client.post("/v1/completions", json=body)).status_code == 200
            s = samples((await client.get("/metrics")).text)
    finally:
        engine.shutdown(timeout=5)
    drafted = value(s, "s2ft_spec_decode_draft_tokens_total")
    assert 0 < value(s, "s2ft_spec_decode_accepted_tokens_total") <= drafted


async def test_engine_info_says_what_computes_mixed_steps(client, engine):
    """An operator can see whether the compiled kernel serves (or the slower fallback does)."""
    s = samples((await client.get("/metrics")).text)
    assert engine.mixed_kernel == "compiled"  # CPU float32 with a compiler, as here
    assert value(s, "s2ft_engine_info", model=engine.model_name, device="cpu", dtype="float32", gemm="exact",
                 mixed_kernel="compiled") == 1


async def test_cuda_graphs_state_is_exported(client, engine):
    """An operator can see whether decode steps replay CUDA graphs: off on a CPU; on a GPU, a failed capture
    (then eager steps) shows as state "failed"."""
    s = samples((await client.get("/metrics")).text)
    assert engine.cuda_graphs == "off" and value(s, "s2ft_cuda_graphs", state="off") == 0
    from s2ft_serve.engine.graphs import DecodeGraphs

    engine.runner.graphs = DecodeGraphs(engine.runner.model, engine.runner.batch, 4, capture=True)  # as on a GPU
    try:
        assert engine.cuda_graphs == "on"
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200  # the capture fails here (no GPU): served eagerly
        s = samples((await client.get("/metrics")).text)
        assert engine.cuda_graphs == "failed" and value(s, "s2ft_cuda_graphs", state="failed") == 0
    finally:  # the module's engine, as it was
        engine.runner.graphs = None

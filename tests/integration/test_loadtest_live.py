"""The load tester against a real `s2ft-serve` process on a loopback port (tiny random model).

Short runs of every mode through the command line: a streamed run, a sweep over adapter counts,
a chaos run (replace, reload, fuse under traffic, every greedy answer re-checked alone), and an
open-loop overload that must be answered with 429s, never 5xx or timeouts.
"""

from __future__ import annotations

import json

import httpx
import pytest
from test_server_openai import start_server, stop_server  # the server suite's process helpers

from loadtest.adapters import AdapterBudget, adapter_names, create_adapters
from loadtest.cli import main

ADMIN_KEY = "loadtest-admin"


@pytest.fixture(scope="module")
def adapter_root(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loadtest-adapters")
    names = adapter_names(4)
    budget = AdapterBudget(scale=0.5)  # large deltas: versions give different greedy tokens
    create_adapters(root, names, str(tiny_llama_dir), budget)
    create_adapters(root, [f"{n}--b" for n in names[:3]], str(tiny_llama_dir), budget, seed_offset=1)
    return root


def start(model_dir, adapter_root, log, *flags: str):
    return start_server(model_dir, adapter_root, log, "--admin-key", ADMIN_KEY, *flags)


@pytest.fixture(scope="module")
def server_process(tiny_llama_dir, adapter_root, tmp_path_factory):
    log = tmp_path_factory.mktemp("loadtest-server") / "server.log"
    server = start(tiny_llama_dir, adapter_root, log, "--max-batch-size", "4", "--max-queue", "8")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def server(server_process):
    return server_process.url


def common(url: str) -> list[str]:
    return ["--url", url, "--admin-key", ADMIN_KEY, "--prompt-len", "uniform:3:8", "--output-len", "6"]


def test_streamed_run_reports_latencies(server_process, tmp_path):
    proc, server = server_process.proc, server_process.url
    out = tmp_path / "run.json"
    rc = main(["run", *common(server), "--requests", "16", "--concurrency", "4", "--stream", "--num-adapters", "3",
               "--popularity", "zipf:1.1", "--include-base", "--server-memory", "--server-pid", str(proc.pid),
               "--cooldown", "0", "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["outcomes"] == {"ok": 16}
    assert report["ttft_ms"]["count"] == 16 and report["tpot_ms"]["count"] >= 1
    assert report["output_token_throughput"] > 0
    assert report["extra"]["server_rss_mb_after"] > 0


def test_a_shared_prefix_is_answered_from_the_prefix_cache(server, tmp_path):
    """One at a time, every prompt after the first finds the shared 40 words' blocks in the server's
    cache; the report's fraction is the usage's cached_tokens over the prompt tokens."""
    out = tmp_path / "run.json"
    rc = main(["run", *common(server), "--requests", "6", "--concurrency", "1", "--num-adapters", "1",
               "--shared-prefix", "40", "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["outcomes"] == {"ok": 6}
    assert 0.4 < report["cached_prompt_fraction"] < 1.0


def test_sweep_over_adapter_counts(server, tmp_path):
    out = tmp_path / "sweep.json"
    rc = main(["sweep", *common(server), "--counts", "1,4", "--requests", "12", "--concurrency", "4",
               "--preload", "admin", "--warmup-requests", "2", "--json", str(out)])
    points = json.loads(out.read_text())["points"]
    assert rc == 0 and [p["count"] for p in points] == [1, 4]
    assert all(p["summary"]["outcomes"] == {"ok": 12} for p in points)
    models = httpx.get(f"{server}/v1/models").json()["data"]
    assert {m["id"] for m in models} >= set(adapter_names(4))


@pytest.mark.parametrize("mode", [[], ["--endpoint", "chat", "--stream"]], ids=["completions", "chat-stream"])
def test_chaos_finds_no_mismatch_and_no_5xx(server, tmp_path, mode):
    """Streamed chat too (QA: the client read no token from the server's chat chunks, so every answer
    was empty and the comparison of empty strings passed)."""
    out = tmp_path / "chaos.json"
    rc = main(["chaos", *common(server), "--requests", "40", "--concurrency", "4", "--num-adapters", "3",
               "--include-base", "--interval", "0.05", *mode, "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["mismatches"] == [] and report["server_errors"] == 0
    assert rc == 0 and report["passed"] and report["verified"] > report["empty"]
    if mode:
        assert report["traffic"]["ttft_ms"]["count"] == report["traffic"]["ok"]
    assert report["distinguishing"] > 0, "the two versions of each adapter should answer differently"
    assert report["admin_ops"], "the chaos task ran no admin operation"


def test_overload_is_answered_with_429(tiny_llama_dir, adapter_root, tmp_path):
    overloaded = start(tiny_llama_dir, adapter_root, tmp_path / "server.log", "--max-batch-size", "1", "--max-queue", "1")
    url = overloaded.url
    try:
        out = tmp_path / "overload.json"
        rc = main(["run", *common(url), "--rate", "400", "--requests", "120", "--timeout", "60",
                   "--output-len", "16", "--json", str(out)])
        report = json.loads(out.read_text())
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        stop_server(overloaded)
    assert rc == 0 and report["requests"] == 120
    assert report["outcomes"].get("429", 0) > 0 and report["ok"] > 0
    assert set(report["outcomes"]) <= {"ok", "429"}, report["outcomes"]

"""Sweep, chaos and the command line, against the fake OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import json

import httpx
import pytest

from fake_openai import BASE
from loadtest.admin import AdminClient, parse_metric
from loadtest.chaos import ChaosPlan, run_chaos
from loadtest.cli import main
from loadtest.client import Target
from loadtest.errors import LoadtestConfigError
from loadtest.sweep import Preload, SweepPoint, parse_counts, run_sweep, sweep_table
from loadtest.workload import LengthDist, WorkloadSpec


def spec(**kw) -> WorkloadSpec:
    base = dict(prompt_len=LengthDist.parse("4"), output_len=LengthDist.parse("5"), num_requests=24, concurrency=4)
    base.update(kw)
    return WorkloadSpec(**base)


async def with_admin(url, fn):
    async with httpx.AsyncClient(base_url=url) as http:
        return await fn(AdminClient(http))


def test_sweep_preloads_and_reports_each_count(fake_server):
    url, state = fake_server
    target = Target(base_url=url, base_model=BASE)
    preload = Preload(mode="admin", server_dir="/srv/adapters", warmup_requests=2)
    points = asyncio.run(with_admin(url, lambda admin: run_sweep([1, 3], spec(), target, admin, preload)))
    assert [p.count for p in points] == [1, 3]
    assert state.adapters == {f"lt-000{i}": f"/srv/adapters/lt-000{i}" for i in range(3)}
    assert all(p.summary.ok == 24 for p in points)
    models = [b["model"] for b in state.bodies[-24:]]
    assert set(models) == {"lt-0000", "lt-0001", "lt-0002"}
    table = sweep_table(points)
    assert "throughput vs number of adapters" in table and "1.000" in table


def test_sweep_include_base_sends_base_requests_beside_the_adapters(fake_server):
    """QA: `sweep --include-base` was accepted and ignored."""
    url, state = fake_server
    target = Target(base_url=url, base_model=BASE)
    preload = Preload(mode="admin", server_dir="/srv/adapters", warmup_requests=0)
    asyncio.run(with_admin(url, lambda admin: run_sweep([2], spec(num_requests=30), target, admin, preload,
                                                        include_base=True)))
    assert {b["model"] for b in state.bodies[-30:]} == {"lt-0000", "lt-0001", BASE}


def test_sweep_rounds_report_the_median_round(fake_server):
    url, _ = fake_server
    target = Target(base_url=url, base_model=BASE)
    preload = Preload(mode="admin", warmup_requests=0)
    points = asyncio.run(with_admin(url, lambda admin: run_sweep([0, 2], spec(num_requests=8), target, admin,
                                                                  preload, rounds=3)))
    for point in points:
        assert len(point.rounds_tok_s) == 3
        assert point.summary.output_token_throughput == sorted(point.rounds_tok_s)[1]
    # four rounds: the row is the lower middle round (20), all its figures from it, not a mean of two (25)
    even = SweepPoint(count=0, summary=dataclasses.replace(points[0].summary, output_token_throughput=20.0),
                      rounds_tok_s=[40.0, 10.0, 20.0, 30.0])
    row = sweep_table([even]).splitlines()[-1]
    assert " 20.0 " in row and " 25.0 " not in row
    assert points[0].summary.labels["adapters"] == 0
    with pytest.raises(LoadtestConfigError, match="round"):
        asyncio.run(with_admin(url, lambda admin: run_sweep([1], spec(), target, admin, preload, rounds=0)))


def test_sweep_warmup_reports_an_adapter_the_server_lacks(fake_server):
    url, _ = fake_server
    target = Target(base_url=url, base_model=BASE)
    with pytest.raises(LoadtestConfigError, match="lt-0000"):
        asyncio.run(with_admin(url, lambda admin: run_sweep([1], spec(), target, admin, Preload(mode="warmup"))))


@pytest.mark.parametrize("text", ["", "1,x", "-1"])
def test_bad_counts(text):
    with pytest.raises(LoadtestConfigError):
        parse_counts(text)


def chaos_plan() -> ChaosPlan:
    return ChaosPlan(names=["lt-0000", "lt-0001"], server_dir="/srv", churn_name="lt-0002", interval_s=0.01)


@pytest.mark.parametrize("endpoint, stream", [("completions", False), ("chat", True)])
def test_chaos_passes_on_a_correct_server(fake_server, endpoint, stream, capsys):
    """Streamed chat included: the fake writes the unset role as null in every delta after the first
    (QA: the client read no token from such chunks, so chaos compared empty strings)."""
    url, state = fake_server
    target = Target(base_url=url, base_model=BASE, endpoint=endpoint, stream=stream)
    workload = spec(adapters=["lt-0000", "lt-0001", None], num_requests=60)
    report = asyncio.run(with_admin(url, lambda admin: run_chaos(workload, target, admin, chaos_plan())))
    assert report.passed, report.mismatches
    # the solo check can outlast the traffic: it says so (QA: a 45 s chaos run was silent for minutes)
    said = re.search(r"chaos: traffic done \((\d+) answers", capsys.readouterr().err)
    assert said and int(said[1]) == report.verified == report.traffic.ok > 0 and report.empty == 0
    if stream:
        assert report.traffic.ttft_ms.count == report.traffic.ok
    assert report.distinguishing > 0  # the fake's versions answer differently: the check has teeth
    ops = {key.split()[0] for key in report.admin_ops}
    assert ops and ops <= {"replace", "unload", "reload", "fuse", "unfuse", "churn-load", "churn-unload"}
    assert all(key.split()[1].startswith("2") for key in report.admin_ops), report.admin_ops
    assert not state.fused


def test_chaos_catches_answers_that_depend_on_the_batch(fake_server):
    url, state = fake_server
    state.corrupt_when_batched = True
    target = Target(base_url=url, base_model=BASE)
    workload = spec(adapters=["lt-0000", "lt-0001", None], num_requests=60, concurrency=6)
    report = asyncio.run(with_admin(url, lambda admin: run_chaos(workload, target, admin, chaos_plan())))
    assert not report.passed and report.mismatches
    assert all("corrupted" in m.got for m in report.mismatches)
    assert json.loads(json.dumps(report.to_dict()))["passed"] is False


def test_cli_json_to_stdout_leaves_stdout_parseable(fake_server, capsys):
    """`--json -`: stdout holds the JSON report alone (the tables go to stderr)."""
    url, _ = fake_server
    rc = main(["run", "--url", url, "--requests", "4", "--concurrency", "2", "--json", "-", "--cooldown", "0"])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["requests"] == 4
    assert "requests" in err and err.strip()


def test_chaos_that_compared_only_empty_answers_does_not_pass(fake_server):
    """Empty answers equal each other whatever the weights: a run whose every answer is empty (QA: a
    client that read no text from a server's chunks) checked nothing and must not pass."""
    url, state = fake_server
    state.answer_nothing = True
    target = Target(base_url=url, base_model=BASE)
    workload = spec(adapters=["lt-0000", "lt-0001", None], num_requests=20)
    report = asyncio.run(with_admin(url, lambda admin: run_chaos(workload, target, admin, chaos_plan())))
    assert not report.mismatches and report.verified == report.empty > 0
    assert report.compared_nothing and not report.passed


def test_chaos_that_got_no_answer_does_not_pass(fake_server):
    """Every request refused (429): no answer was compared, so the run cannot pass either."""
    url, state = fake_server
    state.max_in_flight = 0
    target = Target(base_url=url, base_model=BASE)
    workload = spec(adapters=["lt-0000", "lt-0001"], num_requests=8)
    report = asyncio.run(with_admin(url, lambda admin: run_chaos(workload, target, admin, chaos_plan())))
    assert report.traffic.ok == report.verified == 0 and report.server_errors == 0 and not report.mismatches
    assert report.compared_nothing and not report.passed


def test_cli_chaos_says_when_nothing_was_compared(fake_server, tmp_path, capsys):
    url, state = fake_server
    state.answer_nothing = True
    rc = main(["chaos", "--url", url, "--adapter-dir", str(tmp_path), "--requests", "8", "--interval", "0.01",
               "--num-adapters", "2", "--endpoint", "chat", "--stream", "--json", "-"])
    out, err = capsys.readouterr()
    assert rc == 1 and "chaos FAIL" in err and "every answer was empty (8): nothing was compared" in err
    assert json.loads(out)["compared_nothing"] is True


def test_cli_run_writes_json(fake_server, tmp_path):
    url, _ = fake_server
    out = tmp_path / "run.json"
    rc = main(["run", "--url", url, "--requests", "6", "--concurrency", "2", "--stream", "--json", str(out),
               "--server-memory", "--cooldown", "0"])
    payload = json.loads(out.read_text())
    assert rc == 0 and payload["requests"] == 6 and payload["outcomes"] == {"ok": 6}
    assert payload["extra"]["server_rss_mb_after"] == 100.0
    assert payload["ttft_ms"]["count"] == 6 and payload["labels"]["concurrency"] == 2


def test_cli_chaos_exit_status(fake_server, tmp_path, capsys):
    url, _ = fake_server
    rc = main(["chaos", "--url", url, "--adapter-dir", str(tmp_path), "--requests", "20", "--interval", "0.01",
               "--num-adapters", "2", "--json", "-"])
    out, err = capsys.readouterr()
    assert rc == 0 and "chaos PASS" in err
    assert json.loads(out)["passed"] is True


@pytest.mark.parametrize("argv", [
    ["run", "--popularity", "pareto"],
    ["run", "--output-len", "uniform:5:1"],
    ["sweep", "--counts", "a"],
    ["chaos", "--create"],
    ["chaos", "--num-adapters", "0"],
])
def test_cli_usage_errors_exit_2(fake_server, argv, capsys):
    url, _ = fake_server
    assert main(argv + ["--url", url]) == 2
    assert "s2ft-loadtest: error:" in capsys.readouterr().err


def test_cli_unreachable_server_exits_2(capsys):
    assert main(["run", "--url", "http://127.0.0.1:9", "--requests", "1"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_parse_metric():
    text = '# HELP x\nprocess_resident_memory_bytes 2.5e+08\nfoo{a="b"} 3\n'
    assert parse_metric(text, "process_resident_memory_bytes") == 2.5e8
    assert parse_metric(text, "foo") == 3.0 and parse_metric(text, "bar") is None


def test_process_rss_reads_this_process():
    import os

    from loadtest.admin import process_rss_bytes

    assert process_rss_bytes(os.getpid()) > 1e6
    assert process_rss_bytes(2**22 + 12345) is None

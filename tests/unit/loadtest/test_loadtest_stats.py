"""Percentile maths, summaries and JSON output of the load tester."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from loadtest.client import RequestResult
from loadtest.stats import Distribution, percentile, render_summary, summarize


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy_linear(q, n):
    values = [random.Random(n).uniform(0, 10) for _ in range(n)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_small_cases():
    assert percentile([3.0, 1.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert percentile([5.0], 99) == 5.0


def test_percentile_refuses_bad_input():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def result(index, status=200, e2e=1.0, ttft=None, out=10, prompt=5, kind=None):
    return RequestResult(index=index, adapter=None, status=status, start_s=0.0, e2e_s=e2e, ttft_s=ttft,
                         prompt_tokens=prompt, output_tokens=out, error=None if status == 200 and not kind else "x",
                         error_kind=kind)


def test_summary_counts_outcomes_and_throughput():
    results = [result(0, e2e=1.0, ttft=0.1), result(1, e2e=3.0, ttft=0.3), result(2, status=429),
               result(3, status=503), result(4, status=0, kind="timeout"), result(5, status=503)]
    s = summarize(results, wall_s=2.0, labels={"adapters": 8})
    assert s.requests == 6 and s.ok == 2
    assert s.outcomes == {"429": 1, "503": 2, "ok": 2, "timeout": 1}
    assert s.errors == {"429": 1, "503": 2, "timeout": 1}
    assert s.server_errors == 2
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_token_throughput == pytest.approx(10.0)
    assert s.total_token_throughput == pytest.approx(15.0)
    assert s.e2e_ms.p50 == pytest.approx(2000.0) and s.e2e_ms.max == pytest.approx(3000.0)
    assert s.ttft_ms.p50 == pytest.approx(200.0)
    # tpot = (e2e - ttft) / (out - 1): 0.1 s and 0.3 s
    assert s.tpot_ms.p50 == pytest.approx(200.0)


def test_non_streaming_has_no_ttft_or_tpot():
    s = summarize([result(0), result(1)], wall_s=1.0)
    assert s.ttft_ms is None and s.tpot_ms is None and s.e2e_ms.count == 2


def test_json_round_trips_every_field():
    s = summarize([result(0, ttft=0.2), result(1, status=429)], wall_s=4.0, labels={"popularity": "zipf"})
    s.extra["server_rss_mb_after"] = 123.4
    payload = json.loads(s.to_json())
    assert payload["requests"] == 2 and payload["ok"] == 1
    assert payload["outcomes"] == {"429": 1, "ok": 1}
    assert payload["request_throughput"] == pytest.approx(0.25)
    assert set(payload["e2e_ms"]) == {"count", "mean", "p50", "p90", "p99", "max"}
    assert payload["tpot_ms"]["p99"] == pytest.approx(s.tpot_ms.p99)
    assert payload["labels"] == {"popularity": "zipf"} and payload["extra"]["server_rss_mb_after"] == 123.4
    assert Distribution(**payload["e2e_ms"]) == s.e2e_ms


def test_table_shows_the_numbers():
    s = summarize([result(0, e2e=0.5), result(1, status=503)], wall_s=1.0)
    table = render_summary(s, "t")
    assert "1 / 2" in table and "503: 1" in table and "500.0 / 500.0 / 500.0" in table

"""Summaries of a run: percentiles, throughput, error counts; rendered as a table or as JSON.

Percentiles interpolate linearly between the two nearest ranks (numpy's default), so p50 of an
even-sized sample is the mean of the middle two. Throughput counts successful requests and
their tokens over the run's wall time.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from loadtest.client import RequestResult

PERCENTILES = (50.0, 90.0, 99.0)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) of `values`, linear between closest ranks."""
    if not values:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Distribution:
    """Percentiles of one latency, in milliseconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of_seconds(cls, values: list[float]) -> "Distribution | None":
        if not values:
            return None
        ms = [v * 1000.0 for v in values]
        p50, p90, p99 = (percentile(ms, q) for q in PERCENTILES)
        return cls(count=len(ms), mean=sum(ms) / len(ms), p50=p50, p90=p90, p99=p99, max=max(ms))


@dataclass
class Summary:
    """Everything a run reports. `outcomes` counts "ok" and each error (HTTP status or kind)."""

    requests: int
    ok: int
    outcomes: dict[str, int]
    wall_s: float
    request_throughput: float  # successful requests per second
    output_token_throughput: float  # generated tokens per second
    total_token_throughput: float  # prompt + generated tokens per second
    cached_prompt_fraction: float  # share of prompt tokens the server's prefix cache answered
    e2e_ms: Distribution | None
    ttft_ms: Distribution | None
    tpot_ms: Distribution | None
    labels: dict = field(default_factory=dict)  # what was run: counts, popularity, rate...
    extra: dict = field(default_factory=dict)  # e.g. server memory before and after

    @property
    def errors(self) -> dict[str, int]:
        return {k: v for k, v in self.outcomes.items() if k != "ok"}

    @property
    def server_errors(self) -> int:
        """5xx answers: the server failed, as opposed to refusing (4xx) or the network failing."""
        return sum(v for k, v in self.outcomes.items() if k.isdigit() and k.startswith("5"))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def summarize(results: list[RequestResult], wall_s: float, labels: dict | None = None) -> Summary:
    good = [r for r in results if r.ok]
    outcomes = Counter(r.outcome for r in results)
    wall = max(wall_s, 1e-9)
    out_tokens = sum(r.output_tokens for r in good)
    in_tokens = sum(r.prompt_tokens for r in good)
    return Summary(
        requests=len(results),
        ok=len(good),
        outcomes=dict(sorted(outcomes.items())),
        wall_s=wall_s,
        request_throughput=len(good) / wall,
        output_token_throughput=out_tokens / wall,
        total_token_throughput=(in_tokens + out_tokens) / wall,
        cached_prompt_fraction=sum(r.cached_tokens for r in good) / in_tokens if in_tokens else 0.0,
        e2e_ms=Distribution.of_seconds([r.e2e_s for r in good]),
        ttft_ms=Distribution.of_seconds([r.ttft_s for r in good if r.ttft_s is not None]),
        tpot_ms=Distribution.of_seconds([t for r in good if (t := r.tpot_s) is not None]),
        labels=dict(labels or {}),
    )


def summary_rows(summary: Summary) -> list[tuple[str, str]]:
    """(metric, value) pairs: the table, independent of how it is drawn."""
    rows = [
        ("requests (ok / sent)", f"{summary.ok} / {summary.requests}"),
        ("outcomes", ", ".join(f"{k}: {v}" for k, v in summary.outcomes.items()) or "-"),
        ("wall time", f"{summary.wall_s:.2f} s"),
        ("request throughput", f"{summary.request_throughput:.3f} req/s"),
        ("output token throughput", f"{summary.output_token_throughput:.1f} tok/s"),
        ("total token throughput", f"{summary.total_token_throughput:.1f} tok/s"),
        ("prompt tokens from the prefix cache", f"{summary.cached_prompt_fraction:.1%}"),
    ]
    for name, dist in (("e2e", summary.e2e_ms), ("ttft", summary.ttft_ms), ("tpot", summary.tpot_ms)):
        value = "n/a" if dist is None else f"{dist.p50:.1f} / {dist.p90:.1f} / {dist.p99:.1f} (mean {dist.mean:.1f})"
        rows.append((f"{name} ms p50 / p90 / p99", value))
    rows += [(str(k), str(v)) for k, v in summary.extra.items()]
    return rows


def render_table(title: str, header: list[str], rows: list[list[str]] | list[tuple[str, ...]]) -> str:
    """A plain-text table: readable in a terminal, a CI log and a README alike."""
    cells = [list(header)] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return " | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([title, fmt(cells[0]), rule] + [fmt(row) for row in cells[1:]])


def render_summary(summary: Summary, title: str = "load test") -> str:
    return render_table(title, ["metric", "value"], summary_rows(summary))

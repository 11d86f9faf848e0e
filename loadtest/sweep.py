"""Sweep mode: the same load at several adapter counts, and throughput against the count.

For each count N the adapters lt-0000 ... are made resident first (through vLLM's load route,
which s2ft-serve also serves, or by one tiny request each, which s2ft-serve's lazy loading
answers), a short unmeasured warm-up follows, then the measured run. Only the adapter names
change between points: prompts, lengths, seeds and arrivals are identical.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

import httpx

from loadtest.adapters import adapter_names
from loadtest.admin import AdminClient, adapter_path
from loadtest.client import Target, make_http_client, send
from loadtest.errors import LoadtestConfigError
from loadtest.runner import run_workload
from loadtest.stats import Summary, render_table, summarize
from loadtest.workload import RequestSpec, WorkloadSpec

PRELOAD_MODES = ("admin", "warmup", "none")


@dataclass
class SweepPoint:
    count: int  # adapters in the popularity set (0: the base model only)
    summary: Summary  # the round at the (lower) median output token throughput
    rounds_tok_s: list[float] = field(default_factory=list)  # output tok/s of every round, in order


@dataclass(frozen=True)
class Preload:
    """How adapters become resident before a point is measured."""

    mode: str = "warmup"  # admin | warmup | none
    server_dir: str | None = None  # the adapter folder as the server sees it (None: relative paths)
    warmup_requests: int = 8  # unmeasured requests after preloading

    def validate(self) -> None:
        if self.mode not in PRELOAD_MODES:
            raise LoadtestConfigError(f"preload {self.mode!r}: choose one of {', '.join(PRELOAD_MODES)}")


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LoadtestConfigError(f"counts {text!r}: give comma-separated integers, e.g. 1,8,64,512") from None
    if not counts or any(c < 0 for c in counts):
        raise LoadtestConfigError(f"counts {text!r}: give one or more non-negative integers")
    return counts


async def run_sweep(
    counts: list[int], spec: WorkloadSpec, target: Target, admin: AdminClient, preload: Preload,
    prefix: str = "lt-", rounds: int = 1, include_base: bool = False,
) -> list[SweepPoint]:
    """Measure every count, `rounds` times interleaved (1, 8, 64, 1, 8, 64, ...) so that slow drift
    of a shared machine spreads over all counts instead of biasing the last ones."""
    preload.validate()
    if rounds < 1:
        raise LoadtestConfigError("a sweep needs at least one round")
    measured: dict[int, list[Summary]] = {count: [] for count in counts}
    for _ in range(rounds):
        for count in counts:
            measured[count].append(await _measure(count, spec, target, admin, preload, prefix, include_base))
    points = []
    for count in counts:
        ordered = sorted(measured[count], key=lambda s: s.output_token_throughput)
        points.append(SweepPoint(count=count, summary=ordered[(len(ordered) - 1) // 2],
                                 rounds_tok_s=[s.output_token_throughput for s in measured[count]]))
    return points


async def _measure(count: int, spec: WorkloadSpec, target: Target, admin: AdminClient, preload: Preload,
                   prefix: str, include_base: bool = False) -> Summary:
    names: list[str | None] = list(adapter_names(count, prefix)) if count else [None]
    if include_base and count:  # --include-base: the base model takes its share beside the adapters
        names.append(None)
    await _make_resident([n for n in names if n], target, admin, preload, spec.concurrency or 4)
    point_spec = dataclasses.replace(spec, adapters=names)
    if preload.warmup_requests:
        warm = dataclasses.replace(point_spec, num_requests=preload.warmup_requests, duration_s=None,
                                   seed=spec.seed + 1)
        await run_workload(warm, target)
    run = await run_workload(point_spec, target)
    return summarize(run.results, run.wall_s, {"adapters": count, "popularity": spec.popularity.kind})


async def _make_resident(names: list[str], target: Target, admin: AdminClient, preload: Preload,
                         concurrency: int) -> None:
    if not names or preload.mode == "none":
        return
    if preload.mode == "admin":
        loaded = await admin.loaded_adapters()
        for name in names:
            if name not in loaded:
                result = await admin.load_vllm(name, adapter_path(preload.server_dir, name))
                if not 200 <= result.status < 300 and result.status != 409:
                    raise LoadtestConfigError(f"loading adapter {name}: {result.status} {result.message}")
        return
    await _touch_each(names, target, concurrency)


async def _touch_each(names: list[str], target: Target, concurrency: int) -> None:
    """One one-token request per adapter, `concurrency` at a time (lazy loading does the rest)."""
    gate = asyncio.Semaphore(concurrency)
    touch = dataclasses.replace(target, stream=False)

    async def one(client: httpx.AsyncClient, i: int, name: str) -> None:
        async with gate:
            result = await send(client, RequestSpec(i, name, "hello", 1, 0), touch, 0.0)
        if not result.ok:
            raise LoadtestConfigError(f"warming adapter {name}: {result.outcome} {result.error}")

    async with make_http_client(touch, concurrency) as client:
        await asyncio.gather(*(one(client, i, name) for i, name in enumerate(names)))


def sweep_table(points: list[SweepPoint]) -> str:
    """Throughput against the number of adapters: each count's median round (every figure of a row from
    that one round), relative to the first point."""
    if not points:
        return "no sweep points"
    first = median_tok_s(points[0]) or 1e-9
    rows = []
    for p in points:
        s = p.summary
        e2e = f"{s.e2e_ms.p50:.0f} / {s.e2e_ms.p99:.0f}" if s.e2e_ms else "n/a"
        errors = ", ".join(f"{k}: {v}" for k, v in s.errors.items()) or "0"
        spread = " ".join(f"{t:.1f}" for t in p.rounds_tok_s) if len(p.rounds_tok_s) > 1 else "-"
        rows.append([str(p.count), f"{s.request_throughput:.3f}", f"{median_tok_s(p):.1f}",
                     f"{median_tok_s(p) / first:.3f}", e2e, errors, spread])
    header = ["adapters", "req/s", "out tok/s", "vs first", "e2e ms p50 / p99", "errors", "tok/s per round"]
    return render_table("throughput vs number of adapters (each row: the median round by out tok/s)", header, rows)


def median_tok_s(point: SweepPoint) -> float:
    """The (lower) median round's output tok/s: the round `point.summary` is, so a row's req/s, tok/s and
    latencies all come from one round."""
    return point.summary.output_token_throughput

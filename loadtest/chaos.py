"""Chaos mode: adapter churn under traffic, then every greedy answer checked against a solo re-send.

While greedy traffic runs over a few adapters (and the base model), a chaos task keeps calling the
admin API: replace an adapter with its other version (two weight sets, A and B, per name), unload
and reload it, fuse and unfuse it, and load and unload an extra adapter nobody asks for. After the
traffic ends, nothing is fused and each name is set to each of its versions in turn; every
successful answer is re-sent alone under each version and must equal the solo answer of one of them.
The report counts how many answers the versions tell apart, so a check with no teeth shows.
A mismatch (e.g. tokens from mixed or stale weights) or any 5xx fails the run, and so does a run
that compared nothing (no answer, or only empty ones); a 404 for an adapter caught unloaded is a
correct refusal and is only counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import sys
from collections import Counter
from dataclasses import dataclass, field

from loadtest.admin import AdminClient, AdminResult, adapter_path
from loadtest.client import RequestResult, Target
from loadtest.runner import run_workload, send_alone
from loadtest.stats import Summary, summarize
from loadtest.workload import RequestSpec, WorkloadSpec, generate_requests

CHAOS_OPS = ("replace", "reload", "fuse", "churn")


@dataclass(frozen=True)
class ChaosPlan:
    """The adapters under test and where the server finds their two versions."""

    names: list[str]  # adapters that traffic asks for
    server_dir: str = ""  # the adapter folder as the server sees it ("": paths relative to its root)
    version_suffixes: tuple[str, ...] = ("", "--b")  # folder of version v: <server_dir>/<name><suffix>
    churn_name: str | None = None  # an extra adapter loaded and unloaded (no traffic)
    interval_s: float = 0.3  # mean pause between chaos operations
    seed: int = 0

    def path(self, name: str, version: int) -> str:
        return adapter_path(self.server_dir, f"{name}{self.version_suffixes[version]}")


@dataclass
class Mismatch:
    index: int
    adapter: str | None
    got: str
    expected: dict[str, str]  # version label -> solo answer


@dataclass
class ChaosReport:
    traffic: Summary
    admin_ops: dict[str, int]  # "<op> <status>" -> count
    verified: int  # successful answers compared with a solo re-send
    mismatches: list[Mismatch] = field(default_factory=list)
    reference_failures: int = 0  # solo re-sends that did not answer 200
    distinguishing: int = 0  # adapter answers whose versions give different solo text (the check has teeth)
    empty: int = 0  # answers with no text: equal to any other empty answer, so they check nothing

    @property
    def compared_nothing(self) -> bool:
        """No answer was compared, or every answer came back empty (e.g. a client that reads no text from
        the server's chunks): the comparison could not fail, so it must not pass."""
        return self.empty == self.verified

    @property
    def server_errors(self) -> int:
        admin_5xx = sum(v for k, v in self.admin_ops.items() if k.split()[-1].startswith("5"))
        return self.traffic.server_errors + admin_5xx

    @property
    def passed(self) -> bool:
        return (not self.mismatches and self.server_errors == 0 and self.reference_failures == 0
                and not self.compared_nothing)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(server_errors=self.server_errors, passed=self.passed, compared_nothing=self.compared_nothing)
        return out


async def run_chaos(spec: WorkloadSpec, target: Target, admin: AdminClient, plan: ChaosPlan) -> ChaosReport:
    """Traffic and churn together, then the solo check."""
    greedy = dataclasses.replace(target, temperature=0.0)
    for name in plan.names:
        await admin.put(name, plan.path(name, 0))
    done = asyncio.Event()
    churn = asyncio.create_task(_churn(admin, plan, done))
    try:
        run = await run_workload(spec, greedy)
    finally:
        done.set()
        ops = await churn
    await _settle(admin, plan)
    last = max((r.index for r in run.results), default=-1)
    requests = {r.index: r for r in itertools.islice(generate_requests(spec), last + 1)}
    report = ChaosReport(traffic=summarize(run.results, run.wall_s, {"mode": "chaos"}),
                         admin_ops=dict(sorted(Counter(f"{o.op} {o.status}" for o in ops).items())), verified=0)
    await _verify(run.results, requests, greedy, admin, plan, report, run.wall_s)
    return report


async def _churn(admin: AdminClient, plan: ChaosPlan, done: asyncio.Event) -> list[AdminResult]:
    rng = random.Random(plan.seed)
    version = {name: 0 for name in plan.names}
    ops: list[AdminResult] = []
    while not done.is_set():
        op, name = rng.choice(CHAOS_OPS), rng.choice(plan.names)
        if op == "replace":
            version[name] = 1 - version[name]
            ops.append(await admin.put(name, plan.path(name, version[name]), op="replace"))
        elif op == "reload":
            ops.append(await admin.unload(name))
            await _pause(rng, plan, done)
            ops.append(await admin.put(name, plan.path(name, version[name]), op="reload"))
        elif op == "fuse":
            ops.append(await admin.fuse(name))
            await _pause(rng, plan, done)
            ops.append(await admin.unfuse(name))
        elif plan.churn_name:
            ops.append(await admin.put(plan.churn_name, plan.path(plan.churn_name, 0), op="churn-load"))
            await _pause(rng, plan, done)
            ops.append(await admin.unload(plan.churn_name, op="churn-unload"))
        await _pause(rng, plan, done)
    return ops


async def _pause(rng: random.Random, plan: ChaosPlan, done: asyncio.Event) -> None:
    try:
        await asyncio.wait_for(done.wait(), timeout=rng.expovariate(1.0 / plan.interval_s))
    except asyncio.TimeoutError:
        pass


async def _settle(admin: AdminClient, plan: ChaosPlan) -> None:
    """Leave the server in a known state: nothing fused."""
    for name in plan.names:
        await admin.unfuse(name)


async def _verify(results: list[RequestResult], requests: dict[int, RequestSpec], target: Target,
                  admin: AdminClient, plan: ChaosPlan, report: ChaosReport, traffic_s: float) -> None:
    """Re-send each answered request alone under every version of its adapter and compare."""
    answered = {r.index: r for r in results if r.ok}
    print(f"chaos: traffic done ({len(answered)} answers in {traffic_s:.0f} s); checking each alone under each "
          f"adapter version, one at a time (up to {len(answered) * len(plan.version_suffixes)} requests)",
          file=sys.stderr, flush=True)  # the check can take longer than the traffic: say what it is doing
    report.verified = len(answered)
    report.empty = sum(1 for r in answered.values() if not r.text)  # every request asks for >= 1 token
    expected: dict[int, dict[str, str]] = {i: {} for i in answered}
    base = [requests[i] for i, r in answered.items() if r.adapter is None]
    await _collect(base, "base", expected, target, report)
    for version in range(len(plan.version_suffixes)):
        for name in plan.names:
            specs = [requests[i] for i, r in answered.items() if r.adapter == name]
            if specs:
                await admin.put(name, plan.path(name, version))
                await _collect(specs, f"version {version}", expected, target, report)
    report.mismatches = [Mismatch(i, r.adapter, r.text, expected[i]) for i, r in sorted(answered.items())
                         if r.text not in expected[i].values()]
    report.distinguishing = sum(1 for i, r in answered.items() if r.adapter and len(set(expected[i].values())) > 1)


async def _collect(specs: list[RequestSpec], label: str, expected: dict[int, dict[str, str]], target: Target,
                   report: ChaosReport) -> None:
    for spec, solo in zip(specs, await send_alone(specs, target)):
        if solo.ok:
            expected[spec.index][label] = solo.text
        else:
            report.reference_failures += 1

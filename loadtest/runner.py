"""Drive a workload: closed loop (fixed concurrency) or open loop (Poisson arrivals), then stop.

A closed loop keeps `concurrency` requests in flight, each worker sending its next request as
soon as the previous one ends. An open loop sends at the arrival times of a Poisson process
whatever the server's state, which is how overload (429s, queueing) becomes visible. Either
stops after the workload's request count or, with a duration, stops issuing at the deadline and
waits for the requests in flight.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import httpx

from loadtest.client import RequestResult, Target, make_http_client, send
from loadtest.workload import RequestSpec, WorkloadSpec, generate_requests, poisson_gaps

OPEN_LOOP_MAX_CONNECTIONS = 1024  # an open loop must not be throttled by the client's own pool
LAG_WARNING_S = 0.25  # an open loop further behind its Poisson schedule than this says so


@dataclass
class RunResult:
    results: list[RequestResult]  # ordered by request index
    wall_s: float  # from the first send to the last answer


async def run_workload(spec: WorkloadSpec, target: Target, client: httpx.AsyncClient | None = None) -> RunResult:
    """Send the whole workload to `target` and collect every result."""
    spec.validate()
    pool = spec.concurrency or OPEN_LOOP_MAX_CONNECTIONS
    own_client = client is None
    client = client or make_http_client(target, pool)
    try:
        t0 = time.perf_counter()
        deadline = t0 + spec.duration_s if spec.duration_s is not None else None
        requests = generate_requests(spec)
        if spec.concurrency is not None:
            results = await _closed_loop(client, requests, target, spec.concurrency, t0, deadline)
        else:
            results = await _open_loop(client, requests, target, spec, t0, deadline)
        wall = time.perf_counter() - t0
    finally:
        if own_client:
            await client.aclose()
    return RunResult(results=sorted(results, key=lambda r: r.index), wall_s=wall)


async def _closed_loop(
    client: httpx.AsyncClient,
    requests: Iterator[RequestSpec],
    target: Target,
    concurrency: int,
    t0: float,
    deadline: float | None,
) -> list[RequestResult]:
    results: list[RequestResult] = []

    async def worker() -> None:
        # the shared iterator is safe: asyncio runs one coroutine at a time between awaits
        for spec in requests:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            results.append(await send(client, spec, target, t0))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def _open_loop(
    client: httpx.AsyncClient,
    requests: Iterator[RequestSpec],
    target: Target,
    spec: WorkloadSpec,
    t0: float,
    deadline: float | None,
) -> list[RequestResult]:
    assert spec.rate is not None  # validated by WorkloadSpec.validate
    tasks: list[asyncio.Task[RequestResult]] = []
    next_at, lag = t0, 0.0
    for request, gap in zip(requests, poisson_gaps(spec.rate, spec.seed)):
        next_at += gap
        if deadline is not None and next_at >= deadline:
            break
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if deadline is not None and time.perf_counter() >= deadline:
            break  # a client running behind its schedule stops at the deadline too
        lag = max(lag, time.perf_counter() - next_at)
        tasks.append(asyncio.create_task(send(client, request, target, t0)))
    if lag > LAG_WARNING_S:  # the arrivals were not the ones asked for: say so beside the figures
        sent_for = max(time.perf_counter() - t0, 1e-9)
        print(f"open loop: this client fell behind its schedule by up to {lag:.2f} s; it sent {len(tasks)} "
              f"requests in {sent_for:.1f} s ({len(tasks) / sent_for:.1f}/s against --rate {spec.rate:g})",
              file=sys.stderr, flush=True)
    return list(await asyncio.gather(*tasks))


async def send_alone(specs: list[RequestSpec], target: Target) -> list[RequestResult]:
    """Send each request by itself, one after the other (the reference for chaos checks)."""
    async with make_http_client(target, 1) as client:
        t0 = time.perf_counter()
        return [await send(client, spec, target, t0) for spec in specs]

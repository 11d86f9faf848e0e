"""The Ray Serve fleet with 1 and then 2 engine replicas under the same Zipf-popular adapter load.

For each replica count it deploys deploy/ray's application on a local Ray (the CPUs split evenly
between the replicas, so the comparison is fair on a small machine), sends one seeded workload
with the load tester (`loadtest.run_workload`), and reads the fleet's adapter loads from
`GET /fleet`. The routing hit rate is the share of adapter requests that reached a replica already
holding their adapter (1 - loads / adapter requests); next to it, the hit rate that random routing
would get on the same request sequence with the same per-replica bound (simulated LRU).

    python benchmarks/ray_replicas.py --requests 96 --concurrency 8 --adapters 16 --zipf 1.1

Prints a table and the ratios, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import httpx

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "ray"
APP_NAME = "s2ft-bench"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--replicas", default="1,2", help="replica counts to compare")
    p.add_argument("--cpus", type=float, default=2.0, help="CPUs given to Ray (split between the replicas)")
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    p.add_argument("--per-replica", type=int, default=4, help="max_adapters_per_replica")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--adapter-dir", default=None, help="where to write the adapters (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def simulate_random_routing(adapters: list[str | None], replicas: int, per_replica: int, seed: int) -> float:
    """Hit rate of routing each request to a random replica, each replica an LRU of `per_replica`."""
    rng = random.Random(seed)
    caches = [OrderedDict() for _ in range(replicas)]
    hits = total = 0
    for name in adapters:
        if name is None:
            continue
        cache = caches[rng.randrange(replicas)]
        total += 1
        if name in cache:
            hits += 1
            cache.move_to_end(name)
        else:
            cache[name] = True
            if len(cache) > per_replica:
                cache.popitem(last=False)
    return hits / max(total, 1)


def fleet_loads(url: str) -> int:
    view = httpx.get(f"{url}/fleet", timeout=30).json()
    return sum(r["loads"] for r in view["replicas"].values())


def deploy(args: argparse.Namespace, replicas: int, adapter_root: Path, env: dict) -> None:
    from ray import serve
    from s2ft_ray.app import bind_app

    cpus = args.cpus / replicas
    threads = str(max(1, int(cpus)))
    app_args = {"model": args.model, "dtype": args.dtype, "adapter_root": str(adapter_root),
                "max_adapters_per_replica": args.per_replica, "poll_interval_s": 1.0}
    actor = {"num_cpus": cpus * 0.99, "runtime_env": {"env_vars": {**env, "OMP_NUM_THREADS": threads}}}
    app = bind_app(app_args, replica_options={"num_replicas": replicas, "ray_actor_options": actor},
                    ingress_options={"ray_actor_options": {"num_cpus": 0}})
    serve.run(app, name=APP_NAME, route_prefix="/")


async def measure(args: argparse.Namespace, url: str, names: list[str]) -> dict:
    from loadtest.client import Target
    from loadtest.runner import run_workload
    from loadtest.stats import summarize
    from loadtest.workload import LengthDist, Popularity, WorkloadSpec, generate_requests

    spec = WorkloadSpec(adapters=list(names), popularity=Popularity("zipf", args.zipf),
                        prompt_len=LengthDist("const", args.prompt_len), output_len=LengthDist("const", args.output_len),
                        num_requests=args.requests, concurrency=args.concurrency, seed=args.seed)
    base_model = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
    target = Target(base_url=url, base_model=base_model, ignore_eos=True, timeout_s=600)
    warm = WorkloadSpec(adapters=[None], num_requests=2, concurrency=2, output_len=LengthDist("const", 4))
    await run_workload(warm, target)
    before = fleet_loads(url)
    run = await run_workload(spec, target)
    time.sleep(2.0)  # replicas report their loads to the catalog after each one
    loads = fleet_loads(url) - before
    summary = summarize(run.results, run.wall_s)
    sequence = [r.adapter for r in generate_requests(spec)]
    return {"summary": summary, "loads": loads, "hit_rate": 1 - loads / max(len(sequence), 1), "sequence": sequence}


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(DEPLOY_DIR))
    import ray
    from ray import serve

    from loadtest.adapters import AdapterBudget, adapter_names, create_adapters

    adapter_root = Path(args.adapter_dir or tempfile.mkdtemp(prefix="ray-bench-adapters-"))
    names = adapter_names(args.adapters)
    create_adapters(adapter_root, names, args.model, AdapterBudget(heads=1, channels=16, scale=0.02))
    env = {"PYTHONPATH": os.pathsep.join([str(DEPLOY_DIR), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    ray.init(num_cpus=args.cpus, include_dashboard=False, runtime_env={"env_vars": env}, logging_level="error",
             log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    rows = {}
    try:
        for count in [int(c) for c in args.replicas.split(",")]:
            deploy(args, count, adapter_root, env)
            result = asyncio.run(measure(args, url, names))
            result["random_hit_rate"] = simulate_random_routing(result.pop("sequence"), count, args.per_replica,
                                                                args.seed)
            rows[count] = result
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    report(args, rows)


def report(args: argparse.Namespace, rows: dict) -> None:
    print(f"model {args.model or 'SmolLM2-135M-Instruct (default)'}, {args.dtype}, {args.cpus:g} CPUs for Ray; "
          f"{args.requests} requests, concurrency {args.concurrency}, {args.adapters} adapters zipf:{args.zipf}, "
          f"prompt {args.prompt_len} / output {args.output_len} tokens, {args.per_replica} adapters per replica")
    print(f"{'replicas':>8} {'req/s':>7} {'out tok/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'errors':>6} "
          f"{'loads':>5} {'hit rate':>8} {'random routing':>14}")
    out = {}
    for count, r in rows.items():
        s = r["summary"]
        print(f"{count:>8} {s.request_throughput:>7.2f} {s.output_token_throughput:>9.1f} {s.e2e_ms.p50:>8.0f} "
              f"{s.e2e_ms.p90:>8.0f} {s.requests - s.ok:>6} {r['loads']:>5} {r['hit_rate']:>8.3f} "
              f"{r['random_hit_rate']:>14.3f}")
        out[str(count)] = {"req_s": s.request_throughput, "out_tok_s": s.output_token_throughput,
                           "p50_ms": s.e2e_ms.p50, "p90_ms": s.e2e_ms.p90, "errors": s.requests - s.ok,
                           "adapter_loads": r["loads"], "hit_rate": r["hit_rate"],
                           "random_routing_hit_rate": r["random_hit_rate"]}
    counts = sorted(rows)
    ratios = {}
    if len(counts) >= 2:
        lo, hi = rows[counts[0]]["summary"], rows[counts[-1]]["summary"]
        ratios["throughput_ratio"] = hi.output_token_throughput / lo.output_token_throughput
        ratios["p50_latency_ratio"] = hi.e2e_ms.p50 / lo.e2e_ms.p50
        print(f"{counts[-1]} vs {counts[0]} replicas: throughput x{ratios['throughput_ratio']:.2f}, "
              f"p50 latency x{ratios['p50_latency_ratio']:.2f}")
    print(json.dumps({"benchmark": "ray_replicas", "model": args.model or "default", "dtype": args.dtype,
                      "cpus": args.cpus, "requests": args.requests, "concurrency": args.concurrency,
                      "adapters": args.adapters, "zipf": args.zipf, "per_replica": args.per_replica,
                      "results": out, **ratios}))


if __name__ == "__main__":
    main()

"""Prefix caching: time to first token of prompts that share a long prefix, cache hit vs miss.

For each shared-prefix length P, a request's prompt is P shared tokens plus a new 16-token tail,
and `max_tokens=1`, so its wall time is its time to first token. Rounds alternate, in one engine:
  * miss: the cache is emptied (`reset_prefix_cache`) and a new prompt is sent, so all P + 16
    tokens are prefilled (the prompt's blocks are then cached);
  * hit: a new prompt with the same prefix and another tail, so only the tail and the last partial
    block are prefilled after the cached blocks are copied into its row.
With `--burst B`, B such prompts (same prefix, different tails, one adapter each when `--adapters`)
are submitted together and the time is until the last first token: the hits then share one prefill
pass, each row after its own cached prefix. Median over `--repeats` rounds; the ratio is miss / hit.

    python benchmarks/prefix_cache.py --dtype float32 --prefixes 128,512,1024 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine_phase import add_random_adapters, engine_phase
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.engine import Engine
from s2ft_serve.engine.request import SamplingParams


def first_tokens(engine: Engine, prompts: list[list[int]], adapters: list[str | None]) -> tuple[float, int]:
    """Submit together; seconds until every first token, and the prompt tokens served from the cache."""
    started = time.perf_counter()
    handles = [engine.submit(p, a, SamplingParams(max_tokens=1, temperature=0)) for p, a in zip(prompts, adapters)]
    outs = [h.result() for h in handles]
    return time.perf_counter() - started, sum(o.cached_tokens for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prefixes", default="128,512,1024", help="shared-prefix lengths in tokens")
    ap.add_argument("--tail", type=int, default=16, help="new tokens after the prefix")
    ap.add_argument("--burst", type=int, default=1, help="prompts submitted together")
    ap.add_argument("--adapters", action="store_true", help="each prompt of a burst under its own adapter")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gemm", default="exact")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    prefixes = [int(x) for x in args.prefixes.split(",")]
    g = torch.Generator().manual_seed(0)
    with engine_phase(threads):
        engine = Engine(EngineConfig(dtype=args.dtype, device="cpu", gemm=args.gemm, threads=threads,
                                     max_batch_size=max(8, args.burst), max_tokens_per_step=4096,
                                     max_model_len=max(prefixes) + args.tail + 8)).start()
        names = add_random_adapters(engine, args.burst) if args.adapters else [None] * args.burst

        def prompts(prefix: list[int]) -> list[list[int]]:
            return [prefix + torch.randint(100, 20000, (args.tail,), generator=g).tolist() for _ in names]

        warm = min(64, max(prefixes) + args.tail + 7)  # a short --prefixes makes a short context
        engine.generate(list(range(100, 100 + warm)), None, SamplingParams(max_tokens=1))  # warm-up
        rows = []
        for n in prefixes:
            prefix = torch.randint(100, 20000, (n,), generator=g).tolist()
            miss, hit, cached = [], [], 0
            for _ in range(args.repeats):
                engine.reset_prefix_cache()
                miss.append(first_tokens(engine, prompts(prefix), names)[0])
                seconds, cached = first_tokens(engine, prompts(prefix), names)
                hit.append(seconds)
            m, h = statistics.median(miss), statistics.median(hit)
            rows.append({"prefix": n, "tail": args.tail, "burst": args.burst, "cached_tokens": cached,
                         "miss_s": round(m, 4), "hit_s": round(h, 4), "miss_over_hit": round(m / h, 2)})
            print(json.dumps(rows[-1]), flush=True)
        engine.shutdown()
    print(f"\n{args.dtype}, gemm {args.gemm}, {threads} threads, burst {args.burst}"
          f"{' (one adapter each)' if args.adapters else ''}, median of {args.repeats}")
    print(f"{'prefix':>7} {'tail':>5} {'cached':>7} {'miss s':>8} {'hit s':>8} {'miss/hit':>9}")
    for r in rows:
        print(f"{r['prefix']:>7} {r['tail']:>5} {r['cached_tokens']:>7} {r['miss_s']:>8.3f} {r['hit_s']:>8.3f} "
              f"{r['miss_over_hit']:>8.2f}x")


if __name__ == "__main__":
    main()

"""`n` choices of one prompt: the engine prefills the prompt once and copies it (twins), side by side
with the same number of distinct prompts of the same length, which must each be prefilled.

Each round submits N requests together, `max_tokens=1`, so the time until the last answer is the
time to the last first token: N copies of one prompt (what a request with `n: N` becomes) against N
prompts that differ in their first token (so nothing is shared and the prefix cache cannot help; it
is off). Rounds alternate in one engine; median over `--repeats`.

    python benchmarks/n_choices.py --dtype float32 --n 8 --lengths 128,512 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine_phase import engine_phase
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.engine import Engine
from s2ft_serve.engine.request import SamplingParams


def last_first_token(engine: Engine, prompts: list[list[int]]) -> float:
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=0)
    started = time.perf_counter()
    for h in engine.submit_many([(p, None, params) for p in prompts]):  # admitted in one step, as the server does
        h.result()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n", type=int, default=8, help="choices (requests submitted together)")
    ap.add_argument("--lengths", default="128,512", help="prompt lengths in tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    lengths = [int(x) for x in args.lengths.split(",")]
    g = torch.Generator().manual_seed(0)
    rows = []
    with engine_phase(threads):
        engine = Engine(EngineConfig(dtype=args.dtype, device="cpu", threads=threads, max_batch_size=args.n,
                                     max_tokens_per_step=args.n * max(lengths), prefix_cache_bytes=0,
                                     max_model_len=max(lengths) + 8)).start()
        last_first_token(engine, [[1, 2, 3]] * 2)  # warm up
        for length in lengths:
            times: dict[str, list[float]] = {"shared": [], "distinct": []}
            for _ in range(args.repeats):
                body = torch.randint(100, 20000, (length - 1,), generator=g).tolist()
                times["shared"].append(last_first_token(engine, [[7] + body] * args.n))
                times["distinct"].append(last_first_token(engine, [[7 + i] + body for i in range(args.n)]))
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"length": length, "n": args.n, "shared_s": round(med["shared"], 3),
                         "distinct_s": round(med["distinct"], 3), "speedup": round(med["distinct"] / med["shared"], 2)})
            print(f"{args.n} x {length} tokens: one prompt {med['shared']:.3f} s, {args.n} distinct prompts "
                  f"{med['distinct']:.3f} s until the last first token: {med['distinct'] / med['shared']:.1f}x")
        engine.shutdown()
    print(json.dumps({"benchmark": "n_choices", "dtype": args.dtype, "threads": threads, "rows": rows}))


if __name__ == "__main__":
    main()

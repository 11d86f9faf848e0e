"""Prefill of a burst of new requests: one pass for all of them vs one pass per prompt.

The engine prefills the requests admitted in a step together (right-padded, grouped by length;
see `s2ft_serve.engine.stepper.prefill_groups`). This times the runner's prefill of B prompts, each
with its own adapter (and a same-length base burst), both ways, interleaved, on the engine thread,
and prints the ratio: how much sooner the last request of the burst gets its first token.

    python benchmarks/prefill_batch.py --dtype float32 --batch 32 --lengths 16,64
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
from s2ft_serve.model.testing import random_adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lengths", default="16,64", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gemm", default="exact")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    report = {"benchmark": "prefill_batch", "model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "gemm": args.gemm,
              "threads": threads, "batch": args.batch, "results": []}
    with engine_phase(threads):
        engine = Engine(EngineConfig(dtype=args.dtype, device="cpu", max_batch_size=args.batch, max_model_len=512,
                                     max_resident_adapters=args.batch, gemm=args.gemm, threads=threads))
        for i in range(args.batch):
            engine.add_adapter(f"s{i}", random_adapter(engine.loaded.model, engine.model_name, seed=i, heads=1,
                                                       channels=40, scale=0.01))
        registry, runner = engine.registry, engine.runner
        slots = [registry.slots_for(registry.acquire(registry.get(f"s{i}"))) for i in range(args.batch)]

        def measure(length: int, mixed: bool) -> dict:
            g = torch.Generator().manual_seed(length)
            prompts = [torch.randint(100, 20000, (length,), generator=g).tolist() for _ in range(args.batch)]
            st = slots if mixed else [()] * args.batch
            flags = [False] * args.batch

            def one_pass():
                runner.prefill_batch(prompts, 0, st, flags)

            def per_prompt():
                for row, (ids, s) in enumerate(zip(prompts, st)):
                    runner.prefill(ids, row, s, False)

            one_pass(), per_prompt()  # warm up
            times = {"one_pass": [], "per_prompt": []}
            for _ in range(args.repeats):
                for name, fn in (("one_pass", one_pass), ("per_prompt", per_prompt)):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            a, b = statistics.median(times["one_pass"]), statistics.median(times["per_prompt"])
            return {"length": length, "adapters": f"{args.batch} distinct" if mixed else "none", "one_pass_s": round(a, 3),
                    "per_prompt_s": round(b, 3), "speedup": round(b / a, 2),
                    "one_pass_tok_s": round(args.batch * length / a, 1)}

        for length in (int(x) for x in args.lengths.split(",")):
            for mixed in (False, True):
                r = engine.call(measure, length, mixed)
                report["results"].append(r)
                print(f"{args.batch} prompts x {length} tokens, adapters {r['adapters']}: one pass {r['one_pass_s']} s, "
                      f"one per prompt {r['per_prompt_s']} s -> {r['speedup']}x")
        engine.shutdown()
    print(json.dumps(report))


if __name__ == "__main__":
    main()

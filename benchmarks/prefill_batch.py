"""Prefill: a burst of new requests in one pass vs one pass per prompt; a long prompt in chunks.

1. The engine prefills the requests admitted in a step together (right-padded, grouped by length;
   see `s2ft_serve.engine.stepper.prefill_groups`). This times the runner's prefill of B prompts,
   each with its own adapter (and a same-length base burst), both ways, interleaved, on the engine
   thread, and prints the ratio: how much sooner the last request of the burst gets its first token.
2. `--stall`: while 8 requests stream, a long prompt arrives. With a prefill budget per step
   (`max_tokens_per_step`) below its length it is prefilled in chunks between decode steps; the
   figure is the longest pause between two decode steps of the streaming requests, per budget.

    python benchmarks/prefill_batch.py --dtype float32 --batch 32 --lengths 16,64 --stall 1536
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


def stall(args, threads: int, budget: int) -> dict:
    """Longest pause between decode steps of 8 streaming requests while a `--stall`-token prompt prefills."""
    engine = Engine(EngineConfig(dtype=args.dtype, device="cpu", max_batch_size=9, max_model_len=args.stall + 64,
                                 max_tokens_per_step=budget, gemm=args.gemm, threads=threads)).start()
    passes = []  # (time, sequences, tokens) of every forward pass, on the engine thread
    engine.add_step_listener(lambda batch, tokens: passes.append((time.perf_counter(), batch, tokens)))
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    streams = [engine.submit(list(range(1000 + i, 1016 + i)), None, params) for i in range(8)]
    while sum(1 for _, b, t in passes if b == t == 8) < 4:  # the 8 streams are decoding
        time.sleep(0.01)
    arrived = time.perf_counter()
    long = engine.submit(torch.randint(100, 20000, (args.stall,)).tolist(), None,
                         SamplingParams(max_tokens=1, temperature=0))
    long.result()
    first_token = time.perf_counter() - arrived
    for h in streams:
        h.result()
    engine.shutdown()
    decodes = [t for t, b, n in passes if b == n and b >= 8]  # decode steps with the 8 streams
    gaps = [b - a for a, b in zip(decodes, decodes[1:])]
    return {"budget": budget, "long_prompt": args.stall, "max_pause_s": round(max(gaps), 3),
            "median_step_s": round(statistics.median(gaps), 3), "long_first_token_s": round(first_token, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lengths", default="16,64", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gemm", default="exact")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stall", type=int, default=0, help="also measure decode pauses while a prompt of this "
                    "many tokens prefills, at budgets --budgets")
    ap.add_argument("--budgets", default="4096,512,256")
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    report = {"benchmark": "prefill_batch", "model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "gemm": args.gemm,
              "threads": threads, "batch": args.batch, "results": []}
    with engine_phase(threads):
        engine = Engine(EngineConfig(dtype=args.dtype, device="cpu", max_batch_size=args.batch, max_model_len=512,
                                     max_resident_adapters=args.batch, gemm=args.gemm, threads=threads))
        names = add_random_adapters(engine, args.batch)
        registry, runner = engine.registry, engine.runner
        slots = [registry.slots_for(registry.acquire(registry.get(name))) for name in names]

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
        if args.stall:
            report["stall"] = []
            for budget in (int(b) for b in args.budgets.split(",")):
                r = stall(args, threads, budget)
                report["stall"].append(r)
                print(f"8 streams + a {args.stall}-token prompt, prefill budget {budget}: longest decode pause "
                      f"{r['max_pause_s']} s (median step {r['median_step_s']} s); the long prompt's first token "
                      f"after {r['long_first_token_s']} s")
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""Decode step time with structured output vs free text, side by side in one engine.

A batch of B chat requests (B different cities, greedy) runs once free and once with a JSON schema
(`response_format`'s json_schema through `SamplingParams(guide=...)`), alternating for `--rounds`.
The figure is the median wall time between consecutive full-batch decode steps (a step listener
records them), so answers of different lengths and the prefill do not enter it; the guided steps
include computing every row's token mask (llguidance) and applying it.

    python benchmarks/structured_output.py --dtype float32 --batch 32 --tokens 48 --rounds 3
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
from s2ft_serve.engine.request import Guide, SamplingParams

CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Rome", "Delhi", "Accra", "Hanoi", "Berlin", "Madrid",
          "Nairobi", "Sydney", "Toronto", "Dublin", "Lisbon", "Vienna", "Prague", "Seoul", "Manila", "Bogota",
          "Santiago", "Athens", "Warsaw", "Helsinki", "Havana", "Dakar", "Tunis", "Riga", "Kyiv", "Doha"]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population", "sights"],
          "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                         "population": {"type": "integer"},
                         "sights": {"type": "array", "items": {"type": "string"}}}}


def step_times(engine: Engine, prompts: list[list[int]], params: SamplingParams, batch: int) -> list[float]:
    """Wall time between consecutive decode steps that ran the whole batch."""
    marks: list[tuple[float, int]] = []  # (time, batch size of a decode step; -1 for a prefill)

    def mark(n: int, tokens: int) -> None:
        marks.append((time.perf_counter(), n if n == tokens else -1))

    engine.add_step_listener(mark)
    handles = [engine.submit(p, None, params) for p in prompts]
    outs = [h.result() for h in handles]
    engine.stepper.listeners.remove(mark)
    gaps = [b[0] - a[0] for a, b in zip(marks, marks[1:]) if a[1] == batch and b[1] == batch]
    if params.guide is not None:  # the answers must follow the schema
        for out in outs:
            if out.finish_reason == "stop":
                json.loads(out.text)
    return gaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    with engine_phase(threads):
        engine = Engine(EngineConfig(dtype=args.dtype, device="cpu", max_batch_size=args.batch, max_model_len=512,
                                     threads=threads)).start()
        prompts = [engine.apply_chat_template([{"role": "user", "content": f"Describe {c} in JSON."}])
                   for c in (CITIES * (args.batch // len(CITIES) + 1))[: args.batch]]
        free = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
        guided = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True, guide=Guide(json=SCHEMA))
        step_times(engine, prompts[:2], guided, 2)  # warm up (and build llguidance's tokenizer)
        times: dict[str, list[float]] = {"free": [], "guided": []}
        for _ in range(args.rounds):
            times["free"] += step_times(engine, prompts, free, args.batch)
            times["guided"] += step_times(engine, prompts, guided, args.batch)
        engine.shutdown()
    if not all(times.values()):
        raise SystemExit("no decode step of the full batch was timed: raise --tokens (at least 3)")
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    ratio = med["free"] / med["guided"]
    print(f"decode step, batch {args.batch} ({args.dtype}): free {med['free']:.1f} ms, JSON schema "
          f"{med['guided']:.1f} ms over {len(times['free'])} / {len(times['guided'])} steps; "
          f"guided throughput {ratio:.3f}x of free")
    print(json.dumps({"benchmark": "structured_output", "model": "SmolLM2-135M-Instruct", "dtype": args.dtype,
                      "threads": threads, "batch": args.batch, "free_step_ms": round(med["free"], 2),
                      "guided_step_ms": round(med["guided"], 2), "guided_vs_free": round(ratio, 3),
                      "steps": {k: len(v) for k, v in times.items()}}))


if __name__ == "__main__":
    main()

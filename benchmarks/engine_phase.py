"""Shared by the engine benchmarks: thread settings for timing an engine, then other systems, in
one process; random adapters of a budget added to an engine.

PyTorch's CPU build keeps an OpenMP worker pool for every thread that has run a parallel op; with
more pool threads than cores all pools stop spin-waiting and every parallel region pays a wake-up
(see s2ft_serve/engine/thread.py). A server's main thread does no torch work, so while an engine
runs, the benchmark's main thread stays single-threaded (it never gets a pool); other systems
(transformers, PEFT) either run afterwards in that thread with the engine's number of threads, or,
interleaved with the engine, in the engine's own thread through `Engine.call` (engine_throughput.py).
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from s2ft_serve.model.testing import random_adapter

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time"  # the decode benchmarks' prompt


@contextmanager
def engine_phase(threads: int) -> Iterator[None]:
    """Inside: this thread runs torch single-threaded. After: `threads` threads again."""
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def add_random_adapters(engine, count: int, heads: int = 1, channels: int = 40,
                        dtype: torch.dtype = torch.float32) -> list[str]:
    """Add `count` random adapters `s0, s1, ...` (seeds 0, 1, ...; `heads` + `channels` per layer,
    the default is the trainer's default budget on SmolLM2-135M; deltas in `dtype`, as a file saved in
    that dtype holds them) to `engine`; return their names."""
    names = [f"s{i}" for i in range(count)]
    for i, name in enumerate(names):
        engine.add_adapter(name, random_adapter(engine.loaded.model, engine.model_name, seed=i, heads=heads,
                                                channels=channels, scale=0.01, dtype=dtype))
    return names


def measure_with_adapters(args, measure: Callable, adapter_dtype: torch.dtype = torch.float32, **config) -> None:
    """An engine on CPU (`args.dtype`, `args.batch` rows, `args.threads` or torch's threads, and `config`)
    holding `args.batch` random adapters (`add_random_adapters`); `measure(engine, names, args)` runs in
    the engine's thread and its report is printed as JSON."""
    from s2ft_serve.config import EngineConfig
    from s2ft_serve.engine.engine import Engine

    threads = args.threads or torch.get_num_threads()
    with engine_phase(threads):
        engine = Engine(EngineConfig(dtype=args.dtype, device="cpu", max_batch_size=args.batch, max_model_len=256,
                                     max_resident_adapters=args.batch, threads=threads, **config))
        names = add_random_adapters(engine, args.batch, dtype=adapter_dtype)
        report = engine.call(measure, engine, names, args)
        engine.shutdown()
    print(json.dumps(report))


def interleaved_ms(cases: dict[str, Callable[[], object]], repeats: int, warm_up: bool = False) -> dict[str, float]:
    """Each case's median time (ms) over `repeats` rounds that run every case in turn, so the VM's
    swings hit them alike; `warm_up` runs each once first, untimed."""
    if warm_up:
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def prefill_rows(engine, slots_per_row: list[tuple[int, ...]]) -> tuple[list[int], list[int]]:
    """`PROMPT` prefilled into cache rows 0..B-1, row i with `slots_per_row[i]` (call on the engine
    thread); returns the tokens and positions of the decode step after it, which a benchmark can time
    again and again (each run rewrites the same position in place)."""
    ids = engine.tokenize(PROMPT)
    for row, slots in enumerate(slots_per_row):
        engine.runner.prefill(ids, row, slots, all_logits=False)
    return [ids[-1]] * len(slots_per_row), [len(ids)] * len(slots_per_row)

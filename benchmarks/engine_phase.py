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

from contextlib import contextmanager
from typing import Iterator

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


def add_random_adapters(engine, count: int, heads: int = 1, channels: int = 40) -> list[str]:
    """Add `count` random adapters `s0, s1, ...` (seeds 0, 1, ...; `heads` + `channels` per layer,
    the default is the trainer's default budget on SmolLM2-135M) to `engine`; return their names."""
    names = [f"s{i}" for i in range(count)]
    for i, name in enumerate(names):
        engine.add_adapter(name, random_adapter(engine.loaded.model, engine.model_name, seed=i, heads=heads,
                                                channels=channels, scale=0.01))
    return names

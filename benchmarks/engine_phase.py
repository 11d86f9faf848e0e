"""Thread settings for benchmarks that time an engine, then other systems, in one process.

PyTorch's CPU build keeps an OpenMP worker pool for every thread that has run a parallel op; with
more pool threads than cores all pools stop spin-waiting and every parallel region pays a wake-up
(see s2ft_serve/engine/thread.py). A server's main thread does no torch work, so while an engine
runs, the benchmark's main thread stays single-threaded (it never gets a pool); transformers and
PEFT run afterwards, in that thread, with the engine's number of threads.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def engine_phase(threads: int) -> Iterator[None]:
    """Inside: this thread runs torch single-threaded. After: `threads` threads again."""
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

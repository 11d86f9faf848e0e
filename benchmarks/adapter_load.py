"""What an adapter load costs the engine thread (the running batch waits for it): the load as the
engine does it now (files read, parsed and validated in the calling thread; only the install on the
engine thread) against parsing and validating on the engine thread too (as before), side by side.

    python benchmarks/adapter_load.py --loads 12
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine_phase import engine_phase
from s2ft_serve.adapters.format import parse_adapter, read_adapter_file, save_adapter
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.engine import Engine
from s2ft_serve.model.testing import random_adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", type=int, default=12, help="loads per way (alternating)")
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--channels", type=int, default=40)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    with engine_phase(threads), tempfile.TemporaryDirectory() as tmp:
        engine = Engine(EngineConfig(dtype="float32", device="cpu", threads=threads, max_batch_size=4,
                                     max_model_len=256, max_resident_adapters=2 * args.loads + 2)).start()
        folders = []
        for i in range(2 * args.loads + 1):
            folders.append(save_adapter(random_adapter(engine.loaded.model, engine.model_name, seed=i,
                                                       heads=args.heads, channels=args.channels), Path(tmp) / f"a{i}"))
        nbytes = (folders[0] / "adapter_model.safetensors").stat().st_size
        shapes = engine._shapes

        def on_engine_thread(fn, *a) -> float:
            def timed():
                start = time.perf_counter()
                fn(*a)
                return time.perf_counter() - start
            return engine.call(timed)

        engine.load_adapter("warm", str(folders[-1]))
        now, before = [], []
        for i in range(args.loads):  # alternate, so drift hits both alike
            # on the engine thread, `_install_file` runs inline (no second hop)
            adapter = parse_adapter(read_adapter_file(folders[2 * i]), shapes)  # here, as a load does now
            now.append(on_engine_thread(engine._install_file, f"n{i}", adapter, folders[2 * i], False))
            raw = read_adapter_file(folders[2 * i + 1])
            before.append(on_engine_thread(lambda r=raw, n=f"b{i}", f=folders[2 * i + 1]: engine._install_file(
                n, parse_adapter(r, shapes), f, False)))
        engine.shutdown()
    a, b = statistics.median(now) * 1e3, statistics.median(before) * 1e3
    print(f"adapter of {nbytes / 1e6:.1f} MB, {args.loads} loads each, median engine-thread time per load: "
          f"install only {a:.1f} ms, parse + validate + install {b:.1f} ms ({b / a:.1f}x)")


if __name__ == "__main__":
    main()

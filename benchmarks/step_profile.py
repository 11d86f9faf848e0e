"""Where a decode step's time goes: torch.profiler over B requests on the base and on B distinct adapters.

Prints, for each batch, the wall time per decode step, the operators and (on a GPU) the kernels launched
per step, and the ops taking the most time, so a mixed step's extra cost can be placed: launches (a
GPU step of a small model is bound by them), or bytes (a CPU step, see engine_throughput.py).

    python benchmarks/step_profile.py --dtype float32 --batch 32
    python benchmarks/step_profile.py --device cuda --model /tmp/smol-random --dtype bfloat16 --batch 32
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from engine_phase import PROMPT, add_random_adapters
from engine_throughput import sync
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.engine import Engine


def decode_steps(engine: Engine, adapters: list[str | None], steps: int) -> float:
    """In the engine's thread: B rows prefilled with the benchmark prompt (one pass), then `steps` decode steps
    straight through the runner (no sampling, no scheduling); seconds per step."""
    registry, runner = engine.registry, engine.runner
    versions = [registry.acquire(registry.get(a)) if a else None for a in adapters]
    try:
        slots = [registry.slots_for(v) for v in versions]
        ids = engine.tokenize(PROMPT)
        runner.prefill_batch([ids] * len(adapters), 0, slots, [False] * len(adapters))
        last = [7] * len(adapters)
        sync(engine.device)
        start = time.perf_counter()
        for i in range(steps):
            runner.decode(last, [len(ids) + i] * len(adapters), slots)
        sync(engine.device)
        return (time.perf_counter() - start) / steps
    finally:
        for v in versions:
            if v is not None:
                registry.release(v)


def profiled(activities, *args):
    """`decode_steps(*args)` under torch.profiler, started in the engine's thread (it records the thread
    that starts it); the events averaged by name."""
    with profile(activities=activities) as prof:
        decode_steps(*args)
    return prof.key_averages()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed and profiled")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--kernel", default="auto", help="adapter_kernel: auto, native or torch")
    ap.add_argument("--eager", action="store_true", help="on a GPU: no CUDA graphs")
    args = ap.parse_args()
    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device, max_batch_size=args.batch,
                                 max_model_len=256, max_resident_adapters=args.batch, adapter_kernel=args.kernel,
                                 cuda_graphs=not args.eager)).start()
    names = add_random_adapters(engine, args.batch)
    device = engine.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    times = {}
    for label, adapters in (("base", [None] * args.batch), ("mixed", names)):
        engine.call(decode_steps, engine, adapters, 4)  # warm up (on a GPU, the allocator settles)
        times[label] = min(engine.call(decode_steps, engine, adapters, args.steps) for _ in range(3))
        events = engine.call(profiled, activities, engine, adapters, args.steps)
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA") or \
            sum(e.count for e in events if "LaunchKernel" in e.key)  # the launch calls, where no GPU trace came
        ops = sum(e.count for e in events if e.key.startswith("aten::"))
        print(f"== {label}: {times[label] * 1e3:.2f} ms per decode step (batch {args.batch}, {args.dtype}, {device}, "
              f"{engine.mixed_kernel}, "
              f"best of 3 x {args.steps} steps); per step about {ops / args.steps:.0f} aten ops, "
              f"{kernels / args.steps:.0f} GPU kernels (one prefill pass included)")
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
    print(f"mixed/base step throughput: {times['base'] / times['mixed']:.3f}x")
    engine.shutdown()


if __name__ == "__main__":
    main()

"""The serving forward's compiled small-op calls, each switched off in turn in one engine: a decode-step A/B.

One engine holds B distinct adapters and B sequences prefilled into its cache rows (as in
adapter_kernel.py). The same decode step, with no adapter ("base") and with every row its own adapter
("mixed"), is timed in interleaved rounds with all the calls on, and with one of them off (the forward
then runs the eager ops it replaces, with the same bits):
  norm:     each residual add with the RMSNorm after it (`Transformer.add_rms_norm`)
  kv_write: the decode step's cache write (`Transformer.kv_write`)
  rotary:   the rotary embedding of q and k (`Transformer.rotary`)
For each it prints the median over rounds of (step time with it off) / (step time with all on): above
1 the call saves that much. Greedy sampling's argmax over the step's logits is timed alone, compiled
(`sampler.greedy_tokens`) against `torch.argmax`.

    python benchmarks/small_ops.py --batch 32 --steps 5 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine_phase import interleaved_ms, measure_with_adapters, prefill_rows
from s2ft_serve.adapters import native
from s2ft_serve.engine.engine import Engine

CALLS = ("norm", "kv_write", "rotary")
ATTRS = {"norm": "add_rms_norm", "kv_write": "kv_write", "rotary": "rotary"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="decode steps per timing")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    measure_with_adapters(ap.parse_args(), measure)


@torch.inference_mode()
def measure(engine: Engine, names: list[str], args) -> dict:
    runner, registry = engine.runner, engine.registry
    model = runner.model
    compiled = {call: getattr(model, ATTRS[call]) for call in CALLS}
    missing = [call for call, op in compiled.items() if op is None]
    if missing:
        raise SystemExit(f"not compiled here (CPU float32 with the kernels built): {', '.join(missing)}")
    versions = [registry.acquire(registry.get(n)) for n in names]
    mixed = [registry.slots_for(v) for v in versions]
    last, positions = prefill_rows(engine, mixed)
    steps = {"base": [()] * args.batch, "mixed": mixed}
    ratios: dict[str, dict[str, list[float]]] = {kind: {call: [] for call in CALLS} for kind in steps}
    for slots in steps.values():
        runner.decode(last, positions, slots)  # warm: the first pass at a row count probes the GEMM forms
    for _ in range(args.repeats):
        for kind, slots in steps.items():
            times = {}
            for off in (None, *CALLS):
                for call in CALLS:
                    setattr(model, ATTRS[call], None if call == off else compiled[call])
                start = time.perf_counter()
                for _ in range(args.steps):
                    runner.decode(last, positions, slots)
                times[off] = time.perf_counter() - start
            for call in CALLS:
                ratios[kind][call].append(times[call] / times[None])
    for call in CALLS:
        setattr(model, ATTRS[call], compiled[call])
    logits = runner.decode(last, positions, mixed)
    argmax = interleaved_ms({"torch": lambda: logits.argmax(dim=-1), "compiled": lambda: native.argmax_op()(logits)},
                            repeats=50)
    for v in versions:
        registry.release(v)
    report = {"benchmark": "small_ops", "model": engine.model_name, "dtype": args.dtype, "batch": args.batch,
              "threads": torch.get_num_threads(), "rounds": args.repeats,
              "off_over_on": {kind: {call: round(statistics.median(r), 3) for call, r in per.items()}
                              for kind, per in ratios.items()},
              "argmax_ms": {name: round(t, 3) for name, t in argmax.items()}}
    for kind, per in report["off_over_on"].items():
        print(f"{kind} step, each call off / all on: " + ", ".join(f"{c} {r}x" for c, r in per.items()))
    print(f"argmax over [{args.batch}, {logits.shape[-1]}] logits: torch {report['argmax_ms']['torch']} ms, "
          f"compiled {report['argmax_ms']['compiled']} ms")
    return report


if __name__ == "__main__":
    main()

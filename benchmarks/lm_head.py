"""The exact LM head: `F.linear` vs `gemm.WideLinear` (the same bits, `(W @ x.T).T` in vocabulary
blocks where verified), alone at several row counts and inside a base decode step, interleaved.

One engine (`gemm="exact"`) with B sequences prefilled; the same decode step is timed with the LM
head as the model's own Linear and as WideLinear, alternating. Each row count's verdict (the faster
form gives the same bits, or not) is printed with its timings.

    python benchmarks/lm_head.py --batch 32 --rows 1,2,4,8,12,16,24,32,48,64,128 --repeats 9
"""

from __future__ import annotations

import argparse
import json

import torch

from engine_phase import engine_phase, interleaved_ms, prefill_rows
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.engine import Engine
from s2ft_serve.model.gemm import WideLinear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="rows of the timed decode step")
    ap.add_argument("--rows", default="1,2,4,8,12,16,24,32,48,64,128", help="row counts to time the head alone at")
    ap.add_argument("--steps", type=int, default=5, help="decode steps per timing")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    with engine_phase(threads):
        engine = Engine(EngineConfig(dtype="float32", device="cpu", max_batch_size=max(args.batch, 1),
                                     max_model_len=256, gemm="exact", threads=threads))
        report = engine.call(measure, engine, args)
        engine.shutdown()
    print(json.dumps(report))


@torch.inference_mode()
def measure(engine: Engine, args) -> dict:
    model, runner = engine.runner.model, engine.runner
    wide = model.lm_head
    assert isinstance(wide, WideLinear), "the exact engine's LM head is WideLinear"
    linear = wide.linears[0]
    hidden = linear.in_features
    alone = {}
    for rows in (int(r) for r in args.rows.split(",") if r):
        x = torch.randn(rows, hidden)
        wide(x)  # the probe, once per row count
        med = interleaved_ms({"linear": lambda: linear(x), "wide": lambda: wide(x)}, args.repeats)
        alone[rows] = {"same_bits": wide.verified.get(rows, False), "linear_ms": round(med["linear"], 2),
                       "wide_ms": round(med["wide"], 2), "speedup": round(med["linear"] / med["wide"], 2)}
        print(f"LM head alone, {rows} rows: linear {med['linear']:.2f} ms, WideLinear {med['wide']:.2f} ms "
              f"({alone[rows]['speedup']}x; faster form {'used' if alone[rows]['same_bits'] else 'not used: other bits'})")

    B = args.batch
    last, positions = prefill_rows(engine, [()] * B)
    outs = {}

    def decode_steps(head):
        def run():
            model.lm_head = head
            for _ in range(args.steps):  # the same position each time: a step's work, rewritten in place
                outs[head] = runner.decode(last, positions, [()] * B)
        return run

    step = interleaved_ms({"linear": decode_steps(linear), "wide": decode_steps(wide)}, args.repeats, warm_up=True)
    model.lm_head = wide
    med = {name: ms / args.steps for name, ms in step.items()}
    same = torch.equal(outs[linear], outs[wide])
    print(f"base decode step, {B} rows (median of {args.repeats} x {args.steps}): linear head {med['linear']:.1f} ms, "
          f"WideLinear {med['wide']:.1f} ms ({med['linear'] / med['wide']:.3f}x); logits bit-identical: {same}")
    return {"benchmark": "lm_head", "model": engine.model_name, "dtype": "float32", "gemm": "exact",
            "threads": torch.get_num_threads(), "alone": alone,
            "step": {"batch": B, "linear_ms": round(med["linear"], 2), "wide_ms": round(med["wide"], 2),
                     "speedup": round(med["linear"] / med["wide"], 3), "same_bits": same}}


if __name__ == "__main__":
    main()

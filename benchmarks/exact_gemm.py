"""The exact GEMMs: the model's own Linears (MKL's `F.linear`) vs `gemm.ExactLinear` (the same bits,
through the compiled kernel or, for the LM head, `(W @ x.T).T` in vocabulary blocks, where verified),
in a base decode step at several batch sizes and, for the LM head, alone; interleaved.

One engine (`gemm="exact"`) with B sequences prefilled; the same decode step is timed with every
projection (q/k/v, o, gate/up, down, the LM head) as ExactLinear (q/k/v and gate/up fused where
`FusedExact` serves) and as the plain Linear, alternating,
and the two steps' logits are compared bit for bit. Each row count's verdict (which form serves it:
one that gives the Linear's bits, or at the few-row counts where MKL sums otherwise the kernel's
blocked order) is printed with its timings.

    python benchmarks/exact_gemm.py --batches 1,2,3,4,5,8,16,32 --rows 1,2,4,8,12,16,24,32,64,128 --repeats 7
"""

from __future__ import annotations

import argparse
import json

import torch

from engine_phase import engine_phase, interleaved_ms, prefill_rows
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.engine import Engine
from s2ft_serve.model.gemm import ExactLinear


def label(exact: ExactLinear, rows: int) -> str:
    """What serves `rows`: the kernel (in its blocked order where MKL sums otherwise), the transposed
    product, or the Linear (no form matched, or the Linear was faster with the same bits)."""
    form = exact.chosen.get(rows)
    if form is None:
        return "linear"
    return form + ("" if exact.same_bits.get(rows, True) else " (blocked order)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,2,3,4,5,8,16,32", help="rows of the timed decode steps")
    ap.add_argument("--rows", default="1,2,4,8,12,16,24,32,64,128", help="row counts to time the LM head alone at")
    ap.add_argument("--steps", type=int, default=5, help="decode steps per timing")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    batches = [int(b) for b in args.batches.split(",") if b]
    with engine_phase(threads):
        engine = Engine(EngineConfig(dtype="float32", device="cpu", max_batch_size=max(batches), max_model_len=256,
                                     gemm="exact", threads=threads))
        report = engine.call(measure, engine, batches, args)
        engine.shutdown()
    print(json.dumps(report))


def exact_linears(engine: Engine) -> list[ExactLinear]:
    model = engine.runner.model
    mods = [e for dense in (*model.qkv, *model.gate_up) for e in dense.exact]
    mods += [layer.exact for layer in engine.runner.layers.values()]
    return [*mods, model.lm_head]


@torch.inference_mode()
def measure(engine: Engine, batches: list[int], args) -> dict:
    runner, head = engine.runner, engine.runner.model.lm_head
    mods = exact_linears(engine)
    assert all(isinstance(m, ExactLinear) and m.eligible for m in mods), "every exact projection is an ExactLinear"
    model = engine.runner.model
    fused = [(dense, dense.fused) for dense in (*model.qkv, *model.gate_up)]  # q/k/v, gate/up as one GEMM

    def use(exact: bool) -> None:
        for m in mods:
            m.eligible = exact  # not eligible: the plain Linear
        for dense, f in fused:
            dense.fused = f if exact else None

    linear, alone = head.linears[0], {}
    for rows in (int(r) for r in args.rows.split(",") if r):
        x = torch.randn(rows, linear.in_features)
        head(x)  # the probe, once per row count
        med = interleaved_ms({"linear": lambda: linear(x), "exact": lambda: head(x)}, args.repeats)
        form = label(head, rows)
        alone[rows] = {"form": form, "linear_ms": round(med["linear"], 2), "exact_ms": round(med["exact"], 2),
                       "speedup": round(med["linear"] / med["exact"], 2)}
        print(f"LM head alone, {rows} rows: linear {med['linear']:.2f} ms, ExactLinear {med['exact']:.2f} ms "
              f"({alone[rows]['speedup']}x, form: {form})")

    steps = {}
    for B in batches:
        last, positions = prefill_rows(engine, [()] * B)
        outs = {}

        def decode_steps(exact: bool):
            def run():
                use(exact)
                for _ in range(args.steps):  # the same position each time: a step's work, rewritten in place
                    outs[exact] = runner.decode(last, positions, [()] * B)
            return run

        med = interleaved_ms({"linear": decode_steps(False), "exact": decode_steps(True)}, args.repeats, warm_up=True)
        use(True)
        med = {name: ms / args.steps for name, ms in med.items()}
        same = torch.equal(outs[False], outs[True])
        diff = (outs[False] - outs[True]).abs().max().item()
        forms = sorted({label(m, B) for m in mods} | {"fused" for _, f in fused if f is not None and f.caps.get(B)})
        steps[B] = {"linear_ms": round(med["linear"], 2), "exact_ms": round(med["exact"], 2),
                    "speedup": round(med["linear"] / med["exact"], 3), "same_bits": same, "max_abs_diff": diff,
                    "forms": forms}
        print(f"base decode step, {B} rows (median of {args.repeats} x {args.steps}): linear {med['linear']:.1f} ms, "
              f"ExactLinear {med['exact']:.1f} ms ({steps[B]['speedup']:.3f}x; forms {', '.join(forms)}); "
              f"logits bit-identical: {same}" + ("" if same else f" (max abs difference {diff:.2g})"))
    return {"benchmark": "exact_gemm", "model": engine.model_name, "dtype": "float32", "gemm": "exact",
            "threads": torch.get_num_threads(), "head_alone": alone, "decode_step": steps}


if __name__ == "__main__":
    main()

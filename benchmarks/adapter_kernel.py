"""Mixed-adapter decode step: the compiled kernel vs embedding_bag, side by side in one engine.

One engine holds B distinct adapters and B sequences prefilled into its cache rows. The same decode
step (B tokens, one per row) is then timed, interleaved, as
  base:   no adapter on any row;
  native: every row its own adapter, through the compiled kernel (s2ft_serve/adapters/native.py);
  torch:  the same, through `embedding_bag` (the kernel switched off in every adapted module).
Same weights, same cache, same memory layout: only the correction's kernel differs. It also times
each kernel alone over one step's 2 x layers modules, and `torch.sum` over the bytes those modules'
adapter columns hold (the memory-bandwidth floor; see engine_throughput.py). With `--adapter-dtype
bfloat16` (adapters saved in bfloat16) a float32 engine holds them in bfloat16 tables; the step and
the kernel are then also timed over the same values in float32 tables ("native_f32").

With `--rows-lengths`, it also times the correction of a pass of `--rows-prompts` prompts of
different adapters, L tokens each (a speculative verify pass, a burst of short prompts), over all
modules: the compiled kernel (each prompt's slots repeated on its tokens) vs `row_delta` (copy each
prompt's columns, one batched matmul), which sets `layers.NATIVE_MAX_ROW_LEN`.

    python benchmarks/adapter_kernel.py --dtype float32 --batch 32 --steps 10 --repeats 5
    python benchmarks/adapter_kernel.py --steps 1 --repeats 5 --rows-prompts 8 --rows-lengths 2,4,8,16,32
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from engine_phase import interleaved_ms, measure_with_adapters, prefill_rows
from s2ft_serve.adapters.ops import mixed_delta, row_delta
from s2ft_serve.engine.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gemm", default="exact")
    ap.add_argument("--steps", type=int, default=10, help="decode steps per timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--adapter-dtype", default="float32", help="the dtype the adapters' deltas are saved in: "
                    "bfloat16 ones stay bfloat16 in a float32 engine's tables (half the bytes; `torch` widens them)")
    ap.add_argument("--rows-prompts", type=int, default=8, help="prompts in a timed rows pass (<= --batch)")
    ap.add_argument("--rows-lengths", default="", help="tokens per prompt of the rows passes timed, e.g. 2,4,8,16,32")
    args = ap.parse_args()
    measure_with_adapters(args, measure, getattr(torch, args.adapter_dtype), gemm=args.gemm, adapter_kernel="native")


@torch.inference_mode()
def measure(engine: Engine, names: list[str], args) -> dict:
    runner, registry = engine.runner, engine.registry
    versions = [registry.acquire(registry.get(n)) for n in names]
    mixed = [registry.slots_for(v) for v in versions]
    last, positions = prefill_rows(engine, mixed)
    layers = list(runner.layers.values())
    ops = [layer.native for layer in layers]
    # bfloat16 adapters sit in bfloat16 tables (the compiled kernel's); the same values widened to
    # float32 are what `torch` (embedding_bag) reads, and what the kernel read before bfloat16 tables
    held = [layer.slots for layer in layers]
    wide = [dataclasses.replace(s, table=s.table.to(layer.weight.dtype)) for s, layer in zip(held, layers)]
    narrow = any(s.table.dtype != layer.weight.dtype for s, layer in zip(held, layers))

    def decode_steps(slot_tuples, native: bool, tables: list):
        def run():
            for layer, op, table in zip(layers, ops, tables):
                layer.native, layer.slots = (op if native else None), table
            for _ in range(args.steps):  # the same position each time: a step's work, rewritten in place
                runner.decode(last, positions, slot_tuples)
        return run

    cases = {"base": decode_steps([()] * args.batch, True, held), "native": decode_steps(mixed, True, held),
             "torch": decode_steps(mixed, False, wide)}
    if narrow:
        cases["native_f32"] = decode_steps(mixed, True, wide)
    step = {name: ms / args.steps for name, ms in interleaved_ms(cases, args.repeats, warm_up=True).items()}
    for layer, table in zip(layers, held):
        layer.slots = table

    # each kernel alone, over one step's modules and the batch's real slot tables
    token_slots = torch.tensor(mixed, dtype=torch.int64)
    xs = [torch.randn(args.batch, layer.in_features, dtype=layer.weight.dtype) for layer in layers]
    nbytes = sum(layer.slots.table.numel() * layer.slots.table.element_size() for layer in layers)

    def native_pass(tables):
        def run():
            for layer, op, x, s in zip(layers, ops, xs, tables):
                op(torch.zeros(args.batch, layer.out_features, dtype=x.dtype), x, s.table, token_slots, s.ks, s.cols)
        return run

    def torch_pass():
        for x, s in zip(xs, wide):
            rows, cols = s.rows[token_slots].view(args.batch, -1), s.cols[token_slots].view(args.batch, -1)
            mixed_delta(x, s.table, rows, cols)

    def sum_pass():  # the same bytes read as float32: a bfloat16 sum is slower per byte than memory (QA)
        for layer in layers:
            layer.slots.table.reshape(-1).view(torch.float32).sum()

    alone = {"native": native_pass(held), "torch": torch_pass, "sum": sum_pass}
    if narrow:
        alone["native_f32"] = native_pass(wide)
    kernel = interleaved_ms(alone, args.repeats)
    prompts = min(args.rows_prompts, args.batch)  # each prompt one of the batch's adapters
    rows = {str(length): time_rows(layers, ops, token_slots[:prompts], length, args.repeats)
            for length in (int(n) for n in args.rows_lengths.split(",") if n)}
    for v in versions:
        registry.release(v)

    report = {"benchmark": "adapter_kernel", "model": engine.model_name, "dtype": args.dtype,
              "adapter_dtype": args.adapter_dtype, "gemm": args.gemm, "threads": torch.get_num_threads(),
              "batch": args.batch, "adapter_bytes_per_step": nbytes,
              "step_ms": {k: round(v, 2) for k, v in step.items()},
              "kernel_alone_ms": {k: round(v, 2) for k, v in kernel.items()},
              "mixed_vs_base": {k: round(step["base"] / v, 3) for k, v in step.items() if k != "base"},
              "bandwidth_bound": round(step["base"] / (step["base"] + kernel["sum"]), 3),
              "rows_pass_ms": {"prompts": prompts, **rows}}
    print(f"{args.batch} adapters, {args.dtype}, gemm {args.gemm}, {report['threads']} threads; decode step "
          f"(median of {args.repeats} x {args.steps}): base {step['base']:.1f} ms, native {step['native']:.1f} ms "
          f"(+{step['native'] - step['base']:.1f}), torch {step['torch']:.1f} ms (+{step['torch'] - step['base']:.1f})")
    print(f"mixed/base: native {report['mixed_vs_base']['native']}x, torch {report['mixed_vs_base']['torch']}x "
          f"(bandwidth bound {report['bandwidth_bound']}x); native step / torch step "
          f"{step['torch'] / step['native']:.3f}x faster")
    print(f"kernels alone over {nbytes / 1e6:.0f} MB of adapter columns: native {kernel['native']:.2f} ms, "
          f"embedding_bag {kernel['torch']:.2f} ms, torch.sum {kernel['sum']:.2f} ms")
    if narrow:
        print(f"the same values in float32 tables: native step {step['native_f32']:.1f} ms "
              f"(+{step['native_f32'] - step['base']:.1f}, mixed/base {report['mixed_vs_base']['native_f32']}x), "
              f"kernel alone {kernel['native_f32']:.2f} ms; bfloat16 tables' step "
              f"{step['native_f32'] / step['native']:.3f}x faster")
    for length, r in rows.items():
        print(f"rows pass, {prompts} prompts x {length} tokens: native {r['native']:.2f} ms, row_delta "
              f"{r['torch']:.2f} ms ({r['torch'] / r['native']:.2f}x)")
    return report


def time_rows(layers, ops, row_slots: torch.Tensor, length: int, repeats: int) -> dict[str, float]:
    """Every module's correction for P prompts of `length` tokens, each prompt its own slots."""
    P = row_slots.shape[0]
    xs = [torch.randn(P, length, layer.in_features, dtype=layer.weight.dtype) for layer in layers]

    def native_pass():
        token_slots = row_slots.repeat_interleave(length, dim=0)
        for layer, op, x in zip(layers, ops, xs):
            s = layer.slots
            y = torch.zeros(P * length, layer.out_features, dtype=x.dtype)
            op(y, x.view(P * length, -1), s.table, token_slots, s.ks, s.cols)

    def torch_pass():
        for layer, x in zip(layers, xs):
            s = layer.slots
            row_delta(x, s.table, s.rows[row_slots].view(P, -1), s.cols[row_slots].view(P, -1))

    times = interleaved_ms({"native": native_pass, "torch": torch_pass}, repeats)
    return {name: round(ms, 2) for name, ms in times.items()}

if __name__ == "__main__":
    main()

"""Training peak memory and step time: S²FT vs full fine-tuning vs HF PEFT LoRA (equal parameters).

All methods use the default model (SmolLM2-135M-Instruct), the same batch (seeded random
token ids, `--batch-size` x `--seq-len`), AdamW and gradient clipping.

Memory: each method trains `--mem-steps` steps in its own subprocess; the figure is the
process's peak resident set size (Linux VmHWM), reset (`/proc/self/clear_refs` = 5) after the
model is loaded and prepared and read after the last step, so it includes the weights,
gradients, optimizer state and activations. "Overhead" is that peak minus the resident size of
the loaded base model before preparation.

Step time: the three methods, each on its own copy of the model, take steps in turn inside
one process (round-robin, so the load of a shared machine hits them alike), with `--threads`
(default 1) intra-op threads. We report the median over `--steps` rounds (after `--warmup`) of
both the step's CPU time (`time.process_time`, the work done: stable on a shared machine) and its
wall time (noisy when other jobs compete for the cores). All ratios come from one run.

    python benchmarks/train_memory_speed.py --seq-len 128 --batch-size 2 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time


def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> dict:
    import torch

    from s2ft_serve.model.loading import load_model
    from train_methods import prepare, train_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(None, dtype=args.dtype, device="cpu").model
    model.train()
    gc.collect()
    loaded_kb = _status_kb("VmRSS")
    prep = prepare(args.child, model, ratio=args.ratio)
    optimizer = torch.optim.AdamW(prep.params, lr=1e-5)
    batch = make_batch(model.config.vocab_size, args)
    gc.collect()
    reset = _reset_peak()
    for _ in range(args.mem_steps):
        train_step(prep, batch, optimizer)
    peak_kb = _status_kb("VmHWM")
    return {"method": args.child, "detail": prep.detail, "trainable": prep.trainable, "peak_mb": peak_kb / 1024,
            "overhead_mb": (peak_kb - loaded_kb) / 1024, "peak_reset": reset}


def make_batch(vocab_size: int, args: argparse.Namespace) -> dict:
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (args.batch_size, args.seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def step_times(methods: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median CPU and wall time of a step per method, the methods stepping in turn in this process."""
    import torch

    from s2ft_serve.model.loading import load_model
    from train_methods import prepare, train_step

    torch.set_num_threads(args.threads)
    preps, optims = {}, {}
    for m in methods:
        model = load_model(None, dtype=args.dtype, device="cpu").model
        model.train()
        preps[m] = prepare(m, model, ratio=args.ratio)
        optims[m] = torch.optim.AdamW(preps[m].params, lr=1e-5)
    batch = make_batch(model.config.vocab_size, args)
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    wall: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(args.warmup + args.steps):
        for m in methods:
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(preps[m], batch, optims[m])
            if i >= args.warmup:
                cpu[m].append(time.process_time() - start_cpu)
                wall[m].append(time.perf_counter() - start)
    return {m: {"step_cpu_s": statistics.median(cpu[m]), "step_wall_s": statistics.median(wall[m])} for m in methods}


def run_method(method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--seq-len", str(args.seq_len), "--batch-size",
           str(args.batch_size), "--mem-steps", str(args.mem_steps), "--dtype", args.dtype,
           "--ratio", str(args.ratio), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ratio", type=float, default=0.01, help="S²FT trainable ratio; LoRA rank matched to it")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default="s2ft,lora,full")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    methods = args.methods.split(",")
    results = {m: run_method(m, args) for m in methods}
    for m, t in step_times(methods, args).items():
        results[m].update(t)
    print(f"{'method':6} {'trainable':>10} {'peak MB':>9} {'overhead MB':>12} {'step CPU s':>11} {'step wall s':>12}  detail")
    for r in results.values():
        print(f"{r['method']:6} {r['trainable']:>10} {r['peak_mb']:>9.0f} {r['overhead_mb']:>12.0f} "
              f"{r['step_cpu_s']:>11.3f} {r['step_wall_s']:>12.3f}  {r['detail']}")
    s, f, lo = results.get("s2ft"), results.get("full"), results.get("lora")
    ratios = {}
    for other, key in ((f, "full"), (lo, "lora")):
        if s and other:
            ratios[f"s2ft_vs_{key}_peak_memory"] = s["peak_mb"] / other["peak_mb"]
            ratios[f"s2ft_vs_{key}_overhead_memory"] = s["overhead_mb"] / other["overhead_mb"]
            ratios[f"s2ft_vs_{key}_step_cpu_time"] = s["step_cpu_s"] / other["step_cpu_s"]
            ratios[f"s2ft_vs_{key}_step_wall_time"] = s["step_wall_s"] / other["step_wall_s"]
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}x")
    print(json.dumps({"benchmark": "train_memory_speed", "model": "SmolLM2-135M-Instruct", "dtype": args.dtype,
                      "batch_size": args.batch_size, "seq_len": args.seq_len, "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()

"""Decode throughput of the engine: mixed adapters vs no adapter, vs HF PEFT LoRA, vs transformers.

All figures are ratios of runs made side by side in this process (the machine is noisy):
  1. a batch of B requests over B distinct S²FT adapters vs the same batch on the base;
  2. the same mixed batch served by HF PEFT LoRA (equal trainable parameters, PEFT's mixed-batch
     `adapter_names`) vs ours;
  3. the engine on the base model vs `transformers` `generate` on the same batch.
Each is measured for both engine GEMM backends (`--gemm exact,onednn`, see s2ft_serve.model.gemm) and
the mixed-step kernels asked for (`--kernel native,torch`: the compiled kernel, embedding_bag).
Decode throughput = generated tokens / (time(N tokens) - time(1 token)), so prefill cancels out; each
system's figure is its best of `--repeats` rounds. For (1) it also prints the median over rounds of
mixed / base measured back to back in the same round, which the VM's swings move less.

It also prints the bound that memory bandwidth puts on (1): with B distinct adapters a decode step
must read every adapter's delta columns (B x parameters x element size bytes, far beyond the CPU's
caches) on top of the base step. The time `torch.sum` takes to stream that many bytes (the fastest
plain read torch has) is a floor for that extra work, so base step / (base step + floor) is the best
mixed/base ratio any exact kernel could reach on this machine, unless it overlapped the read with the
base GEMMs.

    python benchmarks/engine_throughput.py --dtype float32 --batch 32 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine_phase import PROMPT, add_random_adapters, engine_phase
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.engine import Engine
from s2ft_serve.engine.request import SamplingParams


def engine_time(engine: Engine, adapters: list[str | None], tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    handles = [engine.submit(PROMPT, a, params) for a in adapters]
    for h in handles:
        h.result()
    return time.perf_counter() - start


def hf_time(model, tok, batch: int, tokens: int, adapter_names=None) -> float:
    tok.padding_side = "left"
    enc = tok([PROMPT] * batch, return_tensors="pt", padding=True)
    kwargs = {"adapter_names": adapter_names} if adapter_names else {}
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id or 0, **kwargs)
    return time.perf_counter() - start


def decode_tps(timer, batch: int, tokens: int, repeats: int) -> float:
    """Best of `repeats` decode throughput: (tokens - 1) * batch / (t(tokens) - t(1))."""
    best = 0.0
    for _ in range(repeats):
        full, one = timer(tokens), timer(1)
        best = max(best, (tokens - 1) * batch / max(full - one, 1e-9))
    return best


def stream_floor_ms(nbytes: int, dtype: torch.dtype, repeats: int = 20) -> float:
    """Median time (ms) for `torch.sum` to read `nbytes` of `dtype` that are not in any cache."""
    buffers = [torch.ones(nbytes // dtype.itemsize, dtype=dtype) for _ in range(2)]
    times = []
    for i in range(repeats):  # alternate two buffers, so the previous read leaves nothing useful cached
        start = time.perf_counter()
        buffers[i % 2].sum()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def lora_model(base_dir, dtype, n: int, rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["o_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(model, config, adapter_name="l0")
    for i in range(1, n):
        model.add_adapter(f"l{i}", config)
    return model.eval()


def measure_engine(args, gemm: str, kernel: str) -> tuple[dict, object, int]:
    """Decode tok/s of one engine on the base and on B distinct adapters (interleaved repeats)."""
    engine = Engine(EngineConfig(dtype=args.dtype, device="cpu", max_batch_size=args.batch, max_model_len=256,
                                 max_resident_adapters=args.batch, gemm=gemm, adapter_kernel=kernel,
                                 threads=args.threads)).start()
    loaded = engine.loaded
    names = add_random_adapters(engine, args.batch, args.heads, args.channels)
    engine_time(engine, names[:2], 4)  # warm up
    results: dict[str, list[float]] = {"base": [], "mixed": []}
    for _ in range(args.repeats):  # interleave so drift hits both alike
        results["base"].append(decode_tps(lambda n: engine_time(engine, [None] * args.batch, n), args.batch,
                                          args.tokens, 1))
        results["mixed"].append(decode_tps(lambda n: engine_time(engine, names, n), args.batch, args.tokens, 1))
    params = engine.get_adapter("s0").parameters
    engine.shutdown()
    best = {k: max(v) for k, v in results.items()}
    # each round's mixed and base runs are adjacent in time: the median of their ratios is the figure
    # least moved by the VM's swings (a best-of ratio pairs runs that may lie minutes apart)
    best["paired"] = statistics.median(m / b for m, b in zip(results["mixed"], results["base"]))
    return best, loaded, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--heads", type=int, default=1, help="S²FT o_proj heads per layer")
    ap.add_argument("--channels", type=int, default=40, help="S²FT down_proj channels per layer")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gemm", default="exact,onednn", help="engine GEMM backends to measure, comma-separated")
    ap.add_argument("--kernel", default="native", help="mixed-step kernels to measure (native, torch), comma-separated")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for every system measured")
    args = ap.parse_args()
    torch.manual_seed(0)
    args.threads = args.threads or torch.get_num_threads()
    engines = {}
    with engine_phase(args.threads):
        for gemm in args.gemm.split(","):
            for kernel in args.kernel.split(","):
                engines[f"{gemm}+{kernel}"], loaded, params_per_adapter = measure_engine(args, gemm, kernel)
    base_dir, tok, dtype = loaded.path, loaded.tokenizer, loaded.model.dtype
    extra_bytes = args.batch * params_per_adapter * dtype.itemsize
    floor_ms = stream_floor_ms(extra_bytes, dtype)
    cfg = loaded.model.config
    loaded = None
    per_rank = cfg.num_hidden_layers * (2 * cfg.hidden_size + cfg.intermediate_size + cfg.hidden_size)
    rank = max(1, round(params_per_adapter / per_rank))

    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
    hf_tps = decode_tps(lambda n: hf_time(hf, tok, args.batch, n), args.batch, args.tokens, args.repeats)
    hf = None  # free it before PEFT's copy
    peft_tps = None
    if not args.skip_peft:
        lora = lora_model(base_dir, dtype, args.batch, rank)
        lora_names = [f"l{i}" for i in range(args.batch)]
        peft_tps = decode_tps(lambda n: hf_time(lora, tok, args.batch, n, lora_names), args.batch, args.tokens,
                              args.repeats)

    report = {
        "benchmark": "engine_throughput", "model": "SmolLM2-135M-Instruct", "dtype": args.dtype,
        "threads": torch.get_num_threads(), "batch": args.batch, "new_tokens": args.tokens,
        "adapter_params": params_per_adapter, "lora_rank": rank, "transformers_base_tok_s": round(hf_tps, 1),
        "peft_lora_mixed_tok_s": round(peft_tps, 1) if peft_tps else None,
        "adapter_bytes_per_step": extra_bytes, "stream_floor_ms": round(floor_ms, 2), "engines": {},
    }
    print(f"decode tok/s ({args.dtype}, batch {args.batch}): transformers base {hf_tps:.1f}"
          + (f", PEFT LoRA r={rank} mixed {peft_tps:.1f}" if peft_tps else ""))
    print(f"{args.batch} adapters' deltas: {extra_bytes / 1e6:.0f} MB per decode step; torch.sum streams them in "
          f"{floor_ms:.2f} ms ({extra_bytes / floor_ms / 1e6:.1f} GB/s)")
    for name, r in engines.items():
        row = {"base_tok_s": round(r["base"], 1), "mixed_tok_s": round(r["mixed"], 1),
               "mixed_vs_base": round(r["mixed"] / r["base"], 3), "mixed_vs_base_paired": round(r["paired"], 3),
               "ours_vs_peft_mixed": round(r["mixed"] / peft_tps, 2) if peft_tps else None,
               "engine_vs_transformers_base": round(r["base"] / hf_tps, 2)}
        base_ms, mixed_ms = args.batch / r["base"] * 1e3, args.batch / r["mixed"] * 1e3
        row.update(base_step_ms=round(base_ms, 1), mixed_step_ms=round(mixed_ms, 1),
                   mixed_vs_base_bound=round(base_ms / (base_ms + floor_ms), 3))
        report["engines"][name] = row
        print(f"engine {name}: base {r['base']:.1f}, {args.batch} adapters {r['mixed']:.1f} tok/s; "
              f"mixed/base {row['mixed_vs_base']}x (median of paired rounds {row['mixed_vs_base_paired']}x); ours/PEFT {row['ours_vs_peft_mixed']}x; "
              f"engine/transformers {row['engine_vs_transformers_base']}x; step {base_ms:.1f} ms base, "
              f"{mixed_ms:.1f} ms mixed (+{mixed_ms - base_ms:.1f}); bandwidth bound on mixed/base "
              f"{row['mixed_vs_base_bound']}x")
    print(json.dumps(report))


if __name__ == "__main__":
    main()

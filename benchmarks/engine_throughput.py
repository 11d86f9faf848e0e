"""Decode throughput of the engine: mixed adapters vs no adapter, vs HF PEFT LoRA, vs transformers.

All figures are ratios of runs made side by side in this process (the machine is noisy):
  1. a batch of B requests over B distinct S²FT adapters vs the same batch on the base;
  2. the same mixed batch served by HF PEFT LoRA (equal trainable parameters, PEFT's mixed-batch
     `adapter_names`) vs ours;
  3. the engine on the base model vs `transformers` `generate` on the same batch.
Each is measured for both engine GEMM backends (`--gemm exact,onednn`, see s2ft_serve.model.gemm), the
mixed-step kernels asked for (`--kernel native,torch`: the compiled kernel, embedding_bag) and the
dtypes the adapters' deltas are saved in (`--adapter-dtype float32,bfloat16`: a float32 engine keeps
bfloat16 deltas in bfloat16 for the compiled kernel, half the bytes, the same results).
Decode throughput = generated tokens / (time(N tokens) - time(1 token)), so prefill cancels out.
Every system runs in the engine's thread (transformers and PEFT through `Engine.call`, so all use the
same torch threads and OpenMP pool), in `--repeats` rounds that interleave them; each ratio is the
median over rounds of the two systems' figures in the same round, which the VM's swings (±20% within
minutes) move far less than a ratio of runs minutes apart. Best-of tok/s are printed too.

It also prints the bound that memory bandwidth puts on (1): with B distinct adapters a decode step
must read every adapter's delta columns (B x parameters x element size bytes, far beyond the CPU's
caches) on top of the base step. The time `torch.sum` takes to stream that many bytes (the fastest
plain read torch has) is a floor for that extra work, so base step / (base step + floor) is the best
mixed/base ratio any exact kernel could reach on this machine, unless it overlapped the read with the
base GEMMs.

    python benchmarks/engine_throughput.py --dtype float32 --batch 32 --tokens 32 --repeats 5 --gemm exact,onednn
    python benchmarks/engine_throughput.py --dtype float32 --batch 32 --tokens 32 --repeats 5 --gemm exact \
        --adapter-dtype float32,bfloat16

On a GPU (`--device cuda`): the GEMMs are torch's there (`--gemm` names a CPU path), `--kernel auto`
or `native` is the Triton kernel and `torch` embedding_bag, and `--model` can name any folder, e.g. one
with the default model's architecture and random weights (`benchmarks/random_model.py`): decode speed
does not depend on the weights' values. Decode steps replay CUDA graphs there (`--cuda-graphs on,off`
measures them against eager steps). `benchmarks/gpu_check.sh` runs it so.
"""

from __future__ import annotations

import argparse
import itertools
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_time(model, tok, batch: int, tokens: int, adapter_names=None) -> float:
    tok.padding_side = "left"
    enc = tok([PROMPT] * batch, return_tensors="pt", padding=True).to(model.device)
    kwargs = {"adapter_names": adapter_names} if adapter_names else {}
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id or 0, **kwargs)
    sync(model.device)
    return time.perf_counter() - start


def decode_tps(timer, batch: int, tokens: int) -> float:
    """Decode throughput: (tokens - 1) * batch / (t(tokens) - t(1)), timed again (up to twice) when the
    machine's noise makes t(tokens) come out no longer than t(1)."""
    for _ in range(3):
        full, one = timer(tokens), timer(1)
        if full > one:
            return (tokens - 1) * batch / (full - one)
    raise SystemExit(f"timing noise exceeds the time of {tokens - 1} decode steps: raise --tokens")


def stream_floor_ms(nbytes: int, device: torch.device, repeats: int = 20) -> float:
    """Median time (ms) for `torch.sum` to read `nbytes` that are not in any cache, as float32 (a bfloat16
    sum is slower per byte than the memory: QA, it made the bound of bfloat16 adapters look lower)."""
    buffers = [torch.ones(nbytes // 4, dtype=torch.float32, device=device) for _ in range(2)]
    times = []
    for i in range(repeats):  # alternate two buffers, so the previous read leaves nothing useful cached
        sync(device)
        start = time.perf_counter()
        buffers[i % 2].sum()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def lora_model(base_dir, dtype, device, n: int, rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["o_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(model, config, adapter_name="l0")
    for i in range(1, n):
        model.add_adapter(f"l{i}", config)
    return model.eval()


def load_others(args, engine: Engine) -> tuple[dict, dict]:
    """`transformers` on the base and PEFT LoRA over B adapters with the engine's adapters' parameter
    count, as timers `(engine, tokens) -> seconds` that run in that engine's thread (its torch threads
    and OpenMP pool); and what they are."""
    from transformers import AutoModelForCausalLM

    loaded = engine.loaded
    base_dir, tok, dtype, cfg = loaded.path, loaded.tokenizer, loaded.model.dtype, loaded.model.config
    params = engine.get_adapter("s0").parameters
    per_rank = cfg.num_hidden_layers * (2 * cfg.hidden_size + cfg.intermediate_size + cfg.hidden_size)
    rank = max(1, round(params / per_rank))
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(engine.device).eval()
    others = {"transformers": lambda eng, n: eng.call(hf_time, hf, tok, args.batch, n)}
    if not args.skip_peft:
        lora, lora_names = lora_model(base_dir, dtype, engine.device, args.batch, rank), [f"l{i}" for i in range(args.batch)]
        others["peft"] = lambda eng, n: eng.call(hf_time, lora, tok, args.batch, n, lora_names)
    return others, {"adapter_params": params, "lora_rank": rank, "dtype": dtype,
                    "device": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"}


def measure_engine(args, gemm: str, kernel: str, adapter_dtype: torch.dtype, graphs: bool,
                   others: tuple[dict, dict] | None) -> tuple[dict, tuple[dict, dict], torch.dtype]:
    """Decode tok/s of one engine on the base and on B distinct adapters, and of the other systems
    (`load_others`, loaded with the first engine when None), all in the engine's thread, interleaved
    round by round. Returns every system's figure per round, the other systems for the next engine, and
    the dtype the engine holds the adapters' deltas in (bfloat16 ones stay bfloat16 for the compiled
    kernel of a float32 engine, see adapters/layers.py)."""
    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device, max_batch_size=args.batch,
                                 max_model_len=256,
                                 max_resident_adapters=args.batch, gemm=gemm, adapter_kernel=kernel,
                                 cuda_graphs=graphs, threads=args.threads)).start()
    names = add_random_adapters(engine, args.batch, args.heads, args.channels, adapter_dtype)
    for batch in ([None] * args.batch, names):  # warm up (on a GPU: the GEMMs' plans, the allocator, the kernels,
        # the CUDA graphs)
        engine_time(engine, batch, 4)
    others = others or load_others(args, engine)
    timers = {"base": lambda n: engine_time(engine, [None] * args.batch, n),
              "mixed": lambda n: engine_time(engine, names, n),
              **{name: (lambda n, timer=timer: timer(engine, n)) for name, timer in others[0].items()}}
    rounds: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.repeats):  # interleaved, so the VM's drift hits every system alike
        for name, timer in timers.items():
            rounds[name].append(decode_tps(timer, args.batch, args.tokens))
    held = next(iter(engine.runner.layers.values())).slots.table.dtype
    graphs = engine.runner.graphs
    if graphs is not None:  # a failed capture would read as "graphs change nothing": say so
        print(f"engine {gemm}+{kernel}: CUDA graphs captured {graphs.captured}, failed {graphs.failed}")
    engine.shutdown()
    return rounds, others, held


def paired(rounds: dict[str, list[float]], a: str, b: str) -> float | None:
    """Median over rounds of a / b, each round's two runs close in time: the figure least moved by the
    VM's swings (a ratio of best-ofs pairs runs that may lie minutes apart)."""
    if a not in rounds or b not in rounds:
        return None
    return round(statistics.median(x / y for x, y in zip(rounds[a], rounds[b])), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--heads", type=int, default=1, help="S²FT o_proj heads per layer")
    ap.add_argument("--channels", type=int, default=40, help="S²FT down_proj channels per layer")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds per engine")
    ap.add_argument("--gemm", default="exact,onednn", help="engine GEMM backends to measure, comma-separated")
    ap.add_argument("--kernel", default="native", help="mixed-step kernels to measure (native, torch), comma-separated")
    ap.add_argument("--adapter-dtype", default="float32",
                    help="dtypes the random adapters' deltas are saved in, comma-separated (float32, bfloat16)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for every system measured")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--model", default=None, help="a local Hugging Face folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--cuda-graphs", default="on", help="on a GPU: decode steps as CUDA graphs (on), eager (off), "
                    "or both (on,off)")
    args = ap.parse_args()
    if args.tokens < 2:
        ap.error("--tokens must be at least 2: decode throughput is timed as t(tokens) - t(1)")
    torch.manual_seed(0)
    args.threads = args.threads or torch.get_num_threads()
    engines, others = {}, None
    with engine_phase(args.threads):
        graph_modes = args.cuda_graphs.split(",") if args.device.startswith("cuda") else ["on"]
        for gemm, kernel, adapter_dtype, graphs in itertools.product(
                args.gemm.split(","), args.kernel.split(","), args.adapter_dtype.split(","), graph_modes):
            name = (f"{gemm}+{kernel}" + ("" if adapter_dtype == "float32" else f"+{adapter_dtype} adapters")
                    + ("" if graphs == "on" else "+eager"))
            rounds, others, held = measure_engine(args, gemm, kernel, getattr(torch, adapter_dtype), graphs == "on",
                                                  others)
            engines[name] = (rounds, held)
    info = others[1]
    report = {
        "benchmark": "engine_throughput", "model": args.model or "SmolLM2-135M-Instruct", "dtype": args.dtype,
        "device": info["device"],
        "threads": args.threads, "batch": args.batch, "new_tokens": args.tokens, "rounds": args.repeats,
        "adapter_params": info["adapter_params"], "lora_rank": info["lora_rank"], "engines": {},
    }
    print(f"decode tok/s, {args.dtype}, {info['device']}, batch {args.batch}, {args.threads} threads, best of {args.repeats} "
          f"interleaved rounds; ratios: median over rounds of each round's pair")
    floors = {}
    for name, (rounds, held) in engines.items():
        # the bytes a mixed step must read: the deltas as the engine holds them
        extra_bytes = args.batch * info["adapter_params"] * held.itemsize
        if held not in floors:
            floors[held] = stream_floor_ms(extra_bytes, torch.device(args.device))
            print(f"{args.batch} adapters' deltas held in {str(held).removeprefix('torch.')}: {extra_bytes / 1e6:.0f} "
                  f"MB per decode step, which torch.sum streams in {floors[held]:.2f} ms "
                  f"({extra_bytes / floors[held] / 1e6:.1f} GB/s)")
        floor_ms = floors[held]
        best = {system: round(max(tps), 1) for system, tps in rounds.items()}
        base_ms, mixed_ms = args.batch / best["base"] * 1e3, args.batch / best["mixed"] * 1e3
        row = {"tok_s": best, "rounds_tok_s": {k: [round(x, 1) for x in v] for k, v in rounds.items()},
               "mixed_vs_base": paired(rounds, "mixed", "base"),
               "ours_vs_peft_mixed": paired(rounds, "mixed", "peft"),
               "engine_vs_transformers_base": paired(rounds, "base", "transformers"),
               "base_step_ms": round(base_ms, 1), "mixed_step_ms": round(mixed_ms, 1),
               "mixed_vs_base_bound": round(base_ms / (base_ms + floor_ms), 3),
               "adapter_bytes_per_step": extra_bytes, "stream_floor_ms": round(floor_ms, 2)}
        report["engines"][name] = row
        print(f"engine {name}: tok/s {best}; mixed/base {row['mixed_vs_base']}x (bandwidth bound "
              f"{row['mixed_vs_base_bound']}x), ours/PEFT {row['ours_vs_peft_mixed']}x, engine/transformers "
              f"{row['engine_vs_transformers_base']}x; best steps {base_ms:.1f} ms base, {mixed_ms:.1f} ms mixed")
    print(json.dumps(report))


if __name__ == "__main__":
    main()

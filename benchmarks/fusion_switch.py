"""Fusion benchmark: switch time of the fused adapter, and decode throughput while fused.

Measured side by side in one run on the default model (SmolLM2-135M-Instruct):

1. switch time: the engine's `unfuse(A)` + `fuse(B)` (touches only the adapters' columns) vs
   HF PEFT LoRA `unmerge_adapter()` + `set_adapter(B)` + `merge_adapter()` on o_proj/down_proj,
   with the LoRA rank chosen so both adapters have (about) the same trainable-parameter count;
2. decode throughput of a batch of requests for a fused adapter vs the same batch on the base
   with no adapter fused or requested (and, for reference, the same adapter served unfused).

    python benchmarks/fusion_switch.py [--dtype float32] [--switches 20] [--requests 8] [--max-tokens 48]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from engine_phase import engine_phase
from s2ft_serve.adapters.format import Adapter
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.engine import Engine
from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.model.loading import load_model, target_linears
from s2ft_serve.model.testing import random_adapter


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--heads", type=int, default=1, help="o_proj heads per layer in each S²FT adapter")
    p.add_argument("--channels", type=int, default=32, help="down_proj channels per layer in each S²FT adapter")
    p.add_argument("--switches", type=int, default=20, help="timed switches per system")
    p.add_argument("--requests", type=int, default=8, help="concurrent requests per throughput round")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds per mode (best kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for every system measured")
    return p.parse_args()


def lora_rank_for(model: torch.nn.Module, parameters: int) -> int:
    """The LoRA rank on o_proj + down_proj whose trainable-parameter count is closest to `parameters`."""
    per_rank = sum(lin.in_features + lin.out_features for lin in target_linears(model).values())
    return max(1, round(parameters / per_rank))


class PeftSwitch:
    """Two PEFT LoRA adapters on o_proj/down_proj; `switch()` = unmerge + set_adapter + merge."""

    def __init__(self, model: torch.nn.Module, rank: int) -> None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["o_proj", "down_proj"], lora_dropout=0.0,
                            init_lora_weights=False)  # random B too, so merging does real work
        self.model = get_peft_model(model, config, adapter_name="first")
        self.model.add_adapter("second", config)
        self.parameters = sum(p.numel() for n, p in self.model.named_parameters() if ".first." in n)
        self.model.set_adapter("first")
        self.model.merge_adapter()
        self.names, self.current = ["first", "second"], 0

    def switch(self) -> None:
        self.current = 1 - self.current
        with torch.no_grad():
            self.model.unmerge_adapter()
            self.model.set_adapter(self.names[self.current])
            self.model.merge_adapter()


class EngineSwitch:
    """Two S²FT adapters in the engine; `switch()` = unfuse(current) + fuse(other)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.names, self.current = engine, ["a", "b"], 0
        engine.fuse("a")

    def switch(self) -> None:
        self.engine.unfuse(self.names[self.current])
        self.current = 1 - self.current
        self.engine.fuse(self.names[self.current])

    def close(self) -> None:
        self.engine.unfuse(self.names[self.current])


def switch_times_ms(system, switches: int, warmup: int = 5) -> list[float]:
    """Milliseconds per `switch()` of `system`, after `warmup` untimed switches."""
    for _ in range(warmup):
        system.switch()
    times = []
    for _ in range(switches):
        started = time.perf_counter()
        system.switch()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def throughput(engine: Engine, adapter: str | None, prompts: list[list[int]], max_tokens: int) -> float:
    """Generated tokens per second for one batch of concurrent greedy requests."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    handles = [engine.submit(p, adapter=adapter, params=params) for p in prompts]
    tokens = sum(h.result().num_generated_tokens for h in handles)
    return tokens / (time.perf_counter() - started)


def decode_rates(engine: Engine, args: argparse.Namespace, vocab: int) -> dict[str, float]:
    """Best-of-rounds throughput for: base (nothing fused), adapter a fused, adapter a unfused."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, vocab - 1, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)]
    throughput(engine, None, prompts, 4)  # warm-up
    rates: dict[str, list[float]] = {"base": [], "fused": [], "unfused": []}
    modes = list(rates)
    for r in range(args.rounds):
        for mode in modes[r % 3:] + modes[:r % 3]:  # rotate the order so drifting load hits every mode alike
            if mode == "fused":
                engine.fuse("a")
            rates[mode].append(throughput(engine, None if mode == "base" else "a", prompts, args.max_tokens))
            if mode == "fused":
                engine.unfuse("a")
    return {mode: max(values) for mode, values in rates.items()}


def main() -> None:
    args = parse_args()
    threads = args.threads or torch.get_num_threads()
    with engine_phase(threads):  # the engine first; PEFT after it has shut down
        reference = load_model(None, dtype=args.dtype, device="cpu")
        adapters: dict[str, Adapter] = {
            name: random_adapter(reference.model, reference.name, seed=seed, heads=args.heads,
                                 channels=args.channels, fingerprint=reference.fingerprint)
            for name, seed in (("a", 1), ("b", 2))
        }
        s2ft_params = adapters["a"].num_parameters()
        rank = lora_rank_for(reference.model, s2ft_params)
        engine = Engine(EngineConfig(model=None, dtype=args.dtype, device="cpu", threads=threads)).start()
        for name, adapter in adapters.items():
            engine.add_adapter(name, adapter)
        ours_switch = EngineSwitch(engine)
        ours = switch_times_ms(ours_switch, args.switches)
        ours_switch.close()
        rates = decode_rates(engine, args, reference.model.config.vocab_size)
        engine.shutdown()

    peft = PeftSwitch(reference.model, rank)
    lora_params = peft.parameters
    theirs = switch_times_ms(peft, args.switches)
    del peft

    ours_ms, theirs_ms = statistics.median(ours), statistics.median(theirs)
    result = {
        "benchmark": "fusion_switch", "model": reference.name, "dtype": args.dtype, "device": "cpu",
        "threads": torch.get_num_threads(), "s2ft_parameters": s2ft_params, "lora_rank": rank,
        "lora_parameters": lora_params, "engine_switch_ms": round(ours_ms, 3), "peft_switch_ms": round(theirs_ms, 3),
        "switch_speedup": round(theirs_ms / ours_ms, 2), "requests": args.requests, "max_tokens": args.max_tokens,
        "base_tok_s": round(rates["base"], 1), "fused_tok_s": round(rates["fused"], 1),
        "unfused_tok_s": round(rates["unfused"], 1), "fused_vs_base": round(rates["fused"] / rates["base"], 3),
        "unfused_vs_base": round(rates["unfused"] / rates["base"], 3),
    }
    print(f"trainable parameters per adapter: S²FT {s2ft_params:,}  LoRA r={rank} {lora_params:,}")
    print(f"switch (median of {args.switches}): engine unfuse+fuse {ours_ms:.2f} ms   "
          f"PEFT unmerge+merge {theirs_ms:.2f} ms   speedup {result['switch_speedup']}x")
    print(f"decode, {args.requests} requests x {args.max_tokens} tokens (best of {args.rounds}): base "
          f"{rates['base']:.1f} tok/s   fused adapter {rates['fused']:.1f} tok/s ({result['fused_vs_base']}x)   "
          f"unfused adapter {rates['unfused']:.1f} tok/s ({result['unfused_vs_base']}x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

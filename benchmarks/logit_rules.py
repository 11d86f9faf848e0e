"""Sampling rules (penalties, logit bias, min_tokens) on a batch of decode logits: the engine's batched
rules vs the one-row rules applied row by row (what the engine ran before), side by side.

    python benchmarks/logit_rules.py --batch 32 --prompt 500 --output 100
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.engine.sampler import adjust_logits_batch, adjust_logits_reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary by default")
    ap.add_argument("--prompt", type=int, default=500, help="prompt tokens per sequence")
    ap.add_argument("--output", type=int, default=100, help="generated tokens per sequence")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    rng = random.Random(0)
    logits = torch.randn(args.batch, args.vocab)
    params = [SamplingParams(max_tokens=4096, repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.2,
                             logit_bias={rng.randrange(args.vocab): -5.0})] * args.batch
    prompts = [[rng.randrange(args.vocab) for _ in range(args.prompt)] for _ in range(args.batch)]
    outputs = [[rng.randrange(args.vocab) for _ in range(args.output)] for _ in range(args.batch)]

    def row_by_row() -> torch.Tensor:
        return torch.stack([adjust_logits_reference(logits[i], params[i], prompts[i], outputs[i], set())
                            for i in range(args.batch)])

    def batched() -> torch.Tensor:
        return adjust_logits_batch(logits, params, prompts, outputs, set())

    assert torch.equal(row_by_row(), batched())
    times: dict[str, list[float]] = {"row by row": [], "batched": []}
    for _ in range(args.rounds):  # alternate, so drift hits both alike
        for name, fn in (("row by row", row_by_row), ("batched", batched)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
    print(f"batch {args.batch}, vocab {args.vocab}, {args.prompt} prompt + {args.output} output tokens per row, "
          f"{torch.get_num_threads()} threads: row by row {med['row by row']:.2f} ms, batched {med['batched']:.2f} ms "
          f"per step: {med['row by row'] / med['batched']:.1f}x faster")


if __name__ == "__main__":
    main()

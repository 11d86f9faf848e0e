"""Prompt-lookup speculative decoding vs plain decoding, side by side in one engine.

Chat requests (greedy, or sampled with `--temperature`) of two kinds: `copy` asks the model to repeat or lightly edit a paragraph of its
prompt (where drafts come from), `free` asks for new text. Each batch runs with drafting off and on
(the engine's `speculative_tokens` switched between rounds, same weights), alternating for
`--rounds`; the figure is the median of generated tokens / wall time from submission to the last
answer, for each GEMM backend and batch size. Greedy answers are the same tokens either way (checked); sampled ones are
other draws from the same distribution, so their lengths may differ.

    python benchmarks/speculative.py --dtype float32 --batches 1,4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from engine_phase import engine_phase
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.engine import Engine
from s2ft_serve.engine.request import SamplingParams

PARAGRAPHS = [p for p in (Path(__file__).parent / "general_text.txt").read_text().split("\n\n") if p.strip()]
TASKS = {
    "copy": ["Repeat the following text exactly:\n\n{p}", "Rewrite this text with every sentence on its own line:\n\n{p}",
             "Copy this paragraph, then say how many sentences it has:\n\n{p}",
             "Fix any spelling mistakes in this text and return it:\n\n{p}"],
    "free": ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
             "Describe a busy market in the morning.", "Write a letter to a friend about a trip to the mountains."],
}


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    handles = [engine.submit(p, None, params) for p in prompts]
    outs = [h.result() for h in handles]
    return time.perf_counter() - start, [o.token_ids for o in outs]


def measure(args, gemm: str) -> list[dict]:
    engine = Engine(EngineConfig(dtype=args.dtype, device="cpu", max_batch_size=max(args.batches), max_model_len=1024,
                                 gemm=gemm, threads=args.threads, speculative_tokens=args.k,
                                 speculative_ngram_min=args.ngram_min, speculative_ngram_max=args.ngram_max)).start()
    params = SamplingParams(max_tokens=args.tokens, temperature=args.temperature, seed=0)
    rows = []
    for task, templates in ((t, TASKS[t]) for t in args.tasks.split(",")):
        for batch in args.batches:
            prompts = [engine.apply_chat_template([{"role": "user", "content": templates[i % len(templates)].format(
                p=PARAGRAPHS[i % len(PARAGRAPHS)])}]) for i in range(batch)]
            rates: dict[int, list[float]] = {0: [], args.k: []}  # generated tokens per second, per round
            answers = {}
            stats0 = engine.stats()
            for _ in range(args.rounds):
                for k in (0, args.k):
                    engine.config.speculative_tokens = k
                    elapsed, answers[k] = run(engine, prompts, params)
                    rates[k].append(sum(len(a) for a in answers[k]) / elapsed)
            stats1 = engine.stats()
            drafted = stats1.spec_draft_tokens - stats0.spec_draft_tokens
            accepted = stats1.spec_accepted_tokens - stats0.spec_accepted_tokens
            plain, spec = statistics.median(rates[0]), statistics.median(rates[args.k])
            tokens = sum(len(a) for a in answers[0])
            same = answers[0] == answers[args.k] if args.temperature == 0 else None  # sampled: other draws
            rows.append({"gemm": gemm, "task": task, "batch": batch, "tokens": tokens,
                         "plain_tok_s": round(plain, 1), "spec_tok_s": round(spec, 1), "speedup": round(spec / plain, 2),
                         "accepted_per_draft_token": round(accepted / drafted, 3) if drafted else None,
                         "same_tokens": same})
            print(f"gemm={gemm} {task} batch {batch}: {tokens} tokens, plain {plain:.1f} tok/s, drafting "
                  f"{spec:.1f} tok/s, {spec / plain:.2f}x; {accepted}/{drafted} draft tokens accepted; "
                  f"same tokens: {same}")
    engine.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else seeded sampling")
    ap.add_argument("--tasks", default="copy,free")
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step when drafting")
    ap.add_argument("--ngram-min", type=int, default=EngineConfig.speculative_ngram_min)
    ap.add_argument("--ngram-max", type=int, default=EngineConfig.speculative_ngram_max)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gemm", default="exact,onednn")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.threads = args.threads or torch.get_num_threads()
    rows = []
    with engine_phase(args.threads):
        for gemm in args.gemm.split(","):
            rows += measure(args, gemm)
    print(json.dumps({"benchmark": "speculative", "model": "SmolLM2-135M-Instruct", "dtype": args.dtype,
                      "threads": args.threads, "k": args.k, "temperature": args.temperature, "ngram": [args.ngram_min, args.ngram_max], "max_tokens": args.tokens, "rows": rows}))


if __name__ == "__main__":
    main()

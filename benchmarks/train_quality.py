"""Fine-tuning quality: S²FT vs HF PEFT LoRA (equal trainable parameters) vs full fine-tuning.

The data come from `make_train_tasks.py` (synthetic tasks with checkable answers; the test split
uses held-out words). Each method trains the default model (SmolLM2-135M-Instruct, float32) for
the same number of steps on the same batches, with AdamW, linear warm-up and cosine decay and its
own learning rate; then we report
  * exact-match accuracy on the test split (greedy decoding, answer compared after strip), and
  * forgetting: the relative change of perplexity on held-out general English text.
The untuned base model is measured too. All figures come from one run. With `--seeds 0,1,2`
every seed changes the S²FT selection, the LoRA initialisation, the data order and torch's seed
(within a seed all methods see the same batches), and the tables give each seed and the mean,
min and max over seeds.

    python benchmarks/train_quality.py --steps 60 --batch-size 8 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from make_train_tasks import generate
from s2ft_serve.model.loading import load_model
from s2ft_serve.train import data as D
from s2ft_serve.train.loop import lr_factor
from train_methods import prepare, train_step

DEFAULT_LR = {"s2ft": 2e-3, "lora": 2e-3, "full": 5e-5}


def train_method(method: str, rows: list[D.Example], args: argparse.Namespace, pad_id: int, seed: int):
    loaded = load_model(None, dtype="float32", device="cpu")
    loaded.model.train()
    prep = prepare(method, loaded.model, ratio=args.ratio, seed=seed)
    lr = getattr(args, f"lr_{method}")
    optimizer = torch.optim.AdamW(prep.params, lr=lr)
    batches = [b for epoch in range(100) for b in D.batch_order(len(rows), args.batch_size, epoch, seed)]
    warmup = max(1, args.steps // 10)
    started, losses = time.perf_counter(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, args.steps, warmup, "cosine")
        losses.append(train_step(prep, D.collate([rows[i] for i in batches[step]], pad_id), optimizer))
    prep.model.eval()
    return prep, loaded.tokenizer, {"train_s": time.perf_counter() - started, "lr": lr,
                                    "final_loss": sum(losses[-5:]) / len(losses[-5:])}


@torch.no_grad()
def exact_match(model, tok, records: list[dict], batch: int = 30) -> tuple[float, dict[str, float]]:
    tok.padding_side = "left"
    hits: dict[str, list[int]] = {}
    for i in range(0, len(records), batch):
        chunk = records[i: i + batch]
        enc = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        for r, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(ids, skip_special_tokens=True).split("\n")[0].strip()
            hits.setdefault(r["task"], []).append(int(text == r["completion"].strip()))
    per_task = {t: sum(h) / len(h) for t, h in sorted(hits.items())}
    return sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values()), per_task


@torch.no_grad()
def perplexity(model, rows: list[D.Example], pad_id: int) -> float:
    nll, count = 0.0, 0
    for r in rows:
        batch = D.collate([r], pad_id)
        n = int((batch["labels"][:, 1:] != D.IGNORE).sum())
        nll += float(model(**batch).loss) * n
        count += n
    return math.exp(nll / count)


def run_seed(seed: int, rows: list[D.Example], general: list[D.Example], test: list[dict],
             args: argparse.Namespace, pad_id: int, base_ppl: float) -> dict[str, dict]:
    """Train and evaluate every method with `seed` (selection, LoRA init, data order, torch RNG)."""
    results = {}
    for method in args.methods.split(","):
        torch.manual_seed(seed)
        prep, tok, stats = train_method(method, rows, args, pad_id, seed)
        acc, per_task = exact_match(prep.model, tok, test)
        ppl = perplexity(prep.model, general, pad_id)
        results[method] = {"accuracy": acc, "per_task": per_task, "general_ppl": ppl,
                           "forgetting": ppl / base_ppl - 1.0, "trainable": prep.trainable, "detail": prep.detail, **stats}
        print(json.dumps({"seed": seed, method: results[method]}), flush=True)
    return results


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def summarize(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Per method: mean / min / max over seeds of accuracy, perplexity and forgetting."""
    methods = next(iter(per_seed.values())).keys()
    summary = {}
    for m in methods:
        runs = [per_seed[s][m] for s in per_seed]
        summary[m] = {key: spread([r[key] for r in runs]) for key in ("accuracy", "general_ppl", "forgetting")}
        summary[m].update(trainable=runs[0]["trainable"], lr=runs[0]["lr"], detail=runs[0]["detail"],
                          per_task={t: spread([r["per_task"][t] for r in runs]) for t in runs[0]["per_task"]})
    return summary


def print_tables(base: dict, per_seed: dict[int, dict[str, dict]], summary: dict[str, dict]) -> None:
    print(f"\nbase model: accuracy {base['accuracy']:.3f}, general ppl {base['general_ppl']:.3f}")
    print(f"{'seed':>4} {'method':6} {'accuracy':>9} {'general ppl':>12} {'forgetting':>11} {'final loss':>11}")
    for seed, results in per_seed.items():
        for m, r in results.items():
            print(f"{seed:>4} {m:6} {r['accuracy']:>9.3f} {r['general_ppl']:>12.3f} {r['forgetting']:>+11.2%} "
                  f"{r['final_loss']:>11.4f}")
    print(f"\nover {len(per_seed)} seed(s): mean [min, max]")
    print(f"{'method':6} {'trainable':>11} {'lr':>7}  {'accuracy':^23}  {'general ppl':^26}  {'forgetting':^29}")
    for m, r in summary.items():
        a, p, f = r["accuracy"], r["general_ppl"], r["forgetting"]
        print(f"{m:6} {r['trainable']:>11,} {r['lr']:>7.0e}  {a['mean']:.3f} [{a['min']:.3f}, {a['max']:.3f}]  "
              f"{p['mean']:7.3f} [{p['min']:.3f}, {p['max']:.3f}]  "
              f"{f['mean']:+7.2%} [{f['min']:+.2%}, {f['max']:+.2%}]")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/tmp/s2ft-tasks")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0, help="the one seed, unless --seeds is given")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (overrides --seed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default="s2ft,lora,full")
    for m, lr in DEFAULT_LR.items():
        p.add_argument(f"--lr-{m}", type=float, default=lr)
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    torch.set_num_threads(args.threads)
    data = Path(args.data_dir)
    if not (data / "train.jsonl").exists():
        generate(data, 2000, 210, 0)
    base = load_model(None, dtype="float32", device="cpu")
    tok, pad_id = base.tokenizer, base.tokenizer.pad_token_id
    rows = D.load_examples(data / "train.jsonl", tok, 64)
    general = D.load_examples(data / "general.jsonl", tok, 256)
    test = [json.loads(line) for line in open(data / "test.jsonl")]
    acc, per_task = exact_match(base.model, tok, test)
    base_result = {"accuracy": acc, "per_task": per_task, "general_ppl": perplexity(base.model, general, pad_id)}
    del base
    started = time.perf_counter()
    per_seed = {s: run_seed(s, rows, general, test, args, pad_id, base_result["general_ppl"]) for s in seeds}
    summary = summarize(per_seed)
    print_tables(base_result, per_seed, summary)
    print(json.dumps({"benchmark": "train_quality", "model": "SmolLM2-135M-Instruct", "dtype": "float32",
                      "steps": args.steps, "batch_size": args.batch_size, "seeds": seeds, "test_examples": len(test),
                      "general_tokens": sum(len(r.labels) for r in general), "wall_s": time.perf_counter() - started,
                      "base": base_result, "summary": summary, "per_seed": per_seed}))

if __name__ == "__main__":
    main()

"""Fine-tuning quality: S²FT vs HF PEFT LoRA (equal trainable parameters) vs full fine-tuning.

The data come from `make_train_tasks.py` (synthetic tasks with checkable answers; the test split
uses held-out words). Each method trains the default model (SmolLM2-135M-Instruct, float32) for
the same number of steps on the same batches, with AdamW, linear warm-up and cosine decay and its
own learning rate; then we report
  * exact-match accuracy on the test split (greedy decoding, answer compared after strip), and
  * forgetting: the relative change of perplexity on held-out general English text.
The untuned base model is measured too. All figures come from one run.

    python benchmarks/train_quality.py --steps 80 --batch-size 8
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


def train_method(method: str, rows: list[D.Example], args: argparse.Namespace, pad_id: int):
    loaded = load_model(None, dtype="float32", device="cpu")
    loaded.model.train()
    prep = prepare(method, loaded.model, ratio=args.ratio, seed=args.seed)
    lr = getattr(args, f"lr_{method}")
    optimizer = torch.optim.AdamW(prep.params, lr=lr)
    batches = [b for epoch in range(100) for b in D.batch_order(len(rows), args.batch_size, epoch, args.seed)]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/tmp/s2ft-tasks")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default="s2ft,lora,full")
    for m, lr in DEFAULT_LR.items():
        p.add_argument(f"--lr-{m}", type=float, default=lr)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data_dir)
    if not (data / "train.jsonl").exists():
        generate(data, 2000, 210, args.seed)
    base = load_model(None, dtype="float32", device="cpu")
    tok, pad_id = base.tokenizer, base.tokenizer.pad_token_id
    rows = D.load_examples(data / "train.jsonl", tok, 64)
    general = D.load_examples(data / "general.jsonl", tok, 256)
    test = [json.loads(line) for line in open(data / "test.jsonl")]
    acc, per_task = exact_match(base.model, tok, test)
    base_ppl = perplexity(base.model, general, pad_id)
    results = {"base": {"accuracy": acc, "per_task": per_task, "general_ppl": base_ppl, "forgetting": 0.0}}
    del base
    for method in args.methods.split(","):
        torch.manual_seed(args.seed)
        prep, tok, stats = train_method(method, rows, args, pad_id)
        acc, per_task = exact_match(prep.model, tok, test)
        ppl = perplexity(prep.model, general, pad_id)
        results[method] = {"accuracy": acc, "per_task": per_task, "general_ppl": ppl,
                           "forgetting": ppl / base_ppl - 1.0, "trainable": prep.trainable, "detail": prep.detail, **stats}
        print(json.dumps({method: results[method]}), flush=True)
    print(f"{'method':6} {'trainable':>10} {'lr':>8} {'accuracy':>9} {'general ppl':>12} {'forgetting':>11}")
    for m, r in results.items():
        print(f"{m:6} {r.get('trainable', 0):>10} {r.get('lr', 0):>8.0e} {r['accuracy']:>9.3f} "
              f"{r['general_ppl']:>12.3f} {r['forgetting']:>+11.3%}")
    print(json.dumps({"benchmark": "train_quality", "model": "SmolLM2-135M-Instruct", "dtype": "float32",
                      "steps": args.steps, "batch_size": args.batch_size, "test_examples": len(test),
                      "results": results}))


if __name__ == "__main__":
    main()

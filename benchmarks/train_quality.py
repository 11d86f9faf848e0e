"""Fine-tuning quality: S²FT vs HF PEFT LoRA (equal trainable parameters) vs full fine-tuning.

The data come from `make_train_tasks.py` (synthetic tasks with checkable answers; the test split
uses held-out words). Each method trains the default model (SmolLM2-135M-Instruct, float32) for
the same number of steps on the same batches, with AdamW, linear warm-up and cosine decay and its
own learning rate; then we report
  * exact-match accuracy on the test split (greedy decoding, answer compared after strip), and
  * forgetting: the relative change of perplexity on held-out general English text (its own
    tokens; the end-of-sequence token the trainer appends to `text` rows is left out, see `text_only`).
The untuned base model is measured too. All figures come from one run. With `--seeds 0,1,2`
every seed changes the S²FT selection, the LoRA initialisation, the data order and torch's seed
(within a seed all methods see the same batches), and the tables give each seed and the mean,
min and max over seeds.

Learning rates: with `--lr-grid`, the first seed trains each method at every rate of its grid and
keeps the one with the best exact match on a validation split (the last `--val` training rows,
never trained on); the other seeds use that rate. Test accuracy and forgetting play no part in
the choice, and the sweep is printed whole. `--all-rates` has the other seeds train every rate too
(each method's whole accuracy-forgetting curve over the seeds); `--runs FILE` reuses finished runs
recorded there and appends new ones, so a long run resumes.

Methods: `s2ft` (the trainer's half-and-half budget, or `--s2ft-budget`), `s2ft-ffn` (`down_proj`
channels only, `--ffn-channels` per layer), `lora`, `full`.

    python benchmarks/train_quality.py --data-dir /tmp/s2ft-tasks2 --steps 150 --batch-size 8 \
        --seeds 0,1,2 --methods s2ft,s2ft-ffn,lora,full --all-rates --runs runs.jsonl \
        --lr-grid 's2ft=1e-3,2e-3,4e-3;s2ft-ffn=1e-3,2e-3,4e-3;lora=1e-3,2e-3,4e-3;full=2e-5,5e-5,1e-4'
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from make_train_tasks import generate
from s2ft_serve.model.loading import load_model
from s2ft_serve.train import data as D
from s2ft_serve.train.loop import lr_factor
from s2ft_serve.train.config import TrainConfig
from s2ft_serve.train.selection import Budget
from s2ft_serve.train.trainer import calibration_batches
from train_methods import prepare, train_step

DEFAULT_LR = {"s2ft": 2e-3, "s2ft-ffn": 4e-3, "lora": 2e-3, "full": 5e-5}


def s2ft_budget(method: str, args: argparse.Namespace) -> Budget | None:
    """`s2ft`: `--s2ft-budget`, else the trainer's half-and-half split of `--ratio` (None);
    `s2ft-ffn`: `down_proj` channels only, as the authors' scripts for their GQA model (Llama 3) do."""
    if method == "s2ft-ffn":
        return Budget(0, args.ffn_channels)
    return Budget(*map(int, args.s2ft_budget.split(","))) if method == "s2ft" and args.s2ft_budget else None


def train_method(method: str, lr: float, rows: list[D.Example], args: argparse.Namespace, pad_id: int, seed: int):
    loaded = load_model(None, dtype="float32", device="cpu")
    loaded.model.train()
    calibration = None
    s2ft = method.startswith("s2ft")
    if s2ft and args.s2ft_strategy.split("-")[0] in ("activation", "gradient"):
        calibration = calibration_batches(rows, pad_id, TrainConfig.calibration_fraction, args.batch_size, seed)
    prep = prepare("s2ft" if s2ft else method, loaded.model, ratio=args.ratio, seed=seed, strategy=args.s2ft_strategy,
                   calibration=calibration, budget=s2ft_budget(method, args))
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


def text_only(row: D.Example, eos_id: int | None) -> D.Example:
    """The row without the end-of-sequence token that the trainer appends to `text` rows.

    Perplexity on general text must measure the text. The appended token is the chat model's
    `<|im_end|>`, which every task completion also ends with: fine-tuning teaches it after short
    answers, its loss after a paragraph falls (base: 4.6 nats against 3.5 for the text's own
    tokens), and with 58 paragraphs that alone lowered the measured perplexity by several percent.
    """
    if eos_id is not None and row.input_ids and row.input_ids[-1] == eos_id:
        return D.Example(row.input_ids[:-1], row.labels[:-1])
    return row


@torch.no_grad()
def perplexity(model, rows: list[D.Example], pad_id: int) -> float:
    nll, count = 0.0, 0
    for r in rows:
        batch = D.collate([r], pad_id)
        n = int((batch["labels"][:, 1:] != D.IGNORE).sum())
        nll += float(model(**batch).loss) * n
        count += n
    return math.exp(nll / count)


@dataclass
class Data:
    rows: list[D.Example]  # training rows
    val: list[dict]  # validation prompts (chooses the learning rate)
    val_rows: list[D.Example]  # the same rows tokenized with their answers (validation loss)
    test: list[dict]  # held-out test prompts (reported)
    general: list[D.Example]  # general English (forgetting)
    pad_id: int
    base_ppl: float
    data_hash: str  # of train.jsonl, part of every run's key
    runs: list[dict]  # finished runs to reuse (`--runs`)


def run_key(method: str, lr: float, seed: int, data: Data, args: argparse.Namespace) -> dict:
    """Everything a run's result depends on, for `--runs`."""
    key = {"method": method, "lr": lr, "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
           "val": args.val, "data": data.data_hash}
    if method.startswith("s2ft"):
        budget = s2ft_budget(method, args)
        key.update(strategy=args.s2ft_strategy, budget=[budget.heads_per_layer, budget.channels_per_layer]
                   if budget else f"ratio {args.ratio}")
    elif method == "lora":
        key.update(ratio=args.ratio)
    return key


def load_runs(path: str | None) -> list[dict]:
    if not path or not Path(path).exists():
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def run_one(method: str, lr: float, seed: int, data: Data, args: argparse.Namespace) -> dict:
    """Train `method` at `lr` with `seed` (selection, LoRA init, data order, torch RNG); evaluate it.
    With `--runs`, a run already recorded there under the same key is reused, and new runs are added."""
    key = run_key(method, lr, seed, data, args)
    for run in data.runs:
        if run["key"] == key:
            print(json.dumps({"seed": seed, method: run["result"], "reused": args.runs}), flush=True)
            return run["result"]
    torch.manual_seed(seed)
    prep, tok, stats = train_method(method, lr, data.rows, args, data.pad_id, seed)
    val_acc, _ = exact_match(prep.model, tok, data.val) if data.val else (float("nan"), {})
    val_loss = math.log(perplexity(prep.model, data.val_rows, data.pad_id)) if data.val_rows else float("nan")
    acc, per_task = exact_match(prep.model, tok, data.test)
    ppl = perplexity(prep.model, data.general, data.pad_id)
    result = {"val_accuracy": val_acc, "val_loss": val_loss, "accuracy": acc, "per_task": per_task, "general_ppl": ppl,
              "forgetting": ppl / data.base_ppl - 1.0, "trainable": prep.trainable, "detail": prep.detail, **stats}
    print(json.dumps({"seed": seed, method: result}), flush=True)
    if args.runs:
        data.runs.append({"key": key, "result": result})
        with open(args.runs, "a") as f:
            f.write(json.dumps({"key": key, "result": result}) + "\n")
    return result


def choose_lr(method: str, grid: list[float], seed: int, data: Data, args: argparse.Namespace,
              sweep: dict[str, dict[float, dict]]) -> tuple[float, dict]:
    """Train at every learning rate of `grid` with `seed`; keep the best validation accuracy
    (ties: the smaller rate). Test accuracy and forgetting play no part in the choice."""
    sweep[method] = {lr: run_one(method, lr, seed, data, args) for lr in grid}
    best = max(grid, key=lambda lr: (sweep[method][lr]["val_accuracy"], -lr))
    return best, sweep[method][best]


def parse_grid(text: str) -> dict[str, list[float]]:
    """'s2ft=1e-3,2e-3;full=5e-5' -> {'s2ft': [0.001, 0.002], 'full': [5e-05]}."""
    grid = {}
    for part in filter(None, text.split(";")):
        method, _, rates = part.partition("=")
        grid[method.strip()] = [float(r) for r in rates.split(",")]
    return grid


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def show(s: dict[str, float], fmt: str) -> str:
    """A `spread` as 'mean [min, max]'."""
    return f"{s['mean']:{fmt}} [{s['min']:{fmt}}, {s['max']:{fmt}}]"


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


def print_sweep(sweep: dict[str, dict[float, dict]], chosen: dict[str, float]) -> None:
    print("\nlearning-rate choice (first seed; chosen on validation accuracy, marked *)")
    print(f"{'method':8} {'lr':>8} {'val acc':>8} {'val loss':>9} {'test acc':>9} {'forgetting':>11}")
    for m, runs in sweep.items():
        for lr, r in runs.items():
            mark = "*" if lr == chosen[m] else " "
            print(f"{m:8} {lr:>8.0e}{mark} {r['val_accuracy']:>7.3f} {r.get('val_loss', float('nan')):>9.4f} "
                  f"{r['accuracy']:>9.3f} {r['forgetting']:>+11.2%}")


def print_every_rate(every_rate: dict[str, dict[float, dict]], chosen: dict[str, float], seeds: int) -> None:
    print(f"\nevery rate over {seeds} seed(s): mean [min, max] (* = the rate chosen on the first seed's validation)")
    print(f"{'method':8} {'lr':>8}  {'accuracy':^23}  {'forgetting':^29}")
    for m, rates in every_rate.items():
        for lr, r in rates.items():
            mark = "*" if lr == chosen[m] else " "
            print(f"{m:8} {lr:>8.0e}{mark} {show(r['accuracy'], '.3f')}  {show(r['forgetting'], '+.2%'):>29}")


def print_tables(base: dict, per_seed: dict[int, dict[str, dict]], summary: dict[str, dict]) -> None:
    print(f"\nbase model: accuracy {base['accuracy']:.3f}, general ppl {base['general_ppl']:.3f}")
    print(f"{'seed':>4} {'method':8} {'accuracy':>9} {'general ppl':>12} {'forgetting':>11} {'final loss':>11}")
    for seed, results in per_seed.items():
        for m, r in results.items():
            print(f"{seed:>4} {m:8} {r['accuracy']:>9.3f} {r['general_ppl']:>12.3f} {r['forgetting']:>+11.2%} "
                  f"{r['final_loss']:>11.4f}")
    print(f"\nover {len(per_seed)} seed(s): mean [min, max]")
    print(f"{'method':8} {'trainable':>11} {'lr':>7}  {'accuracy':^23}  {'general ppl':^26}  {'forgetting':^29}")
    for m, r in summary.items():
        print(f"{m:8} {r['trainable']:>11,} {r['lr']:>7.0e}  {show(r['accuracy'], '.3f')}  "
              f"{show(r['general_ppl'], '.3f'):>26}  {show(r['forgetting'], '+.2%'):>29}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/tmp/s2ft-tasks")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0, help="the one seed, unless --seeds is given")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (overrides --seed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default="s2ft,lora,full",
                   help="of s2ft, s2ft-ffn (down_proj channels only), lora, full")
    for m, lr in DEFAULT_LR.items():
        p.add_argument(f"--lr-{m}", type=float, default=lr, help=f"{m} learning rate unless --lr-grid covers it")
    p.add_argument("--lr-grid", default=None,
                   help="learning rates to choose from on validation accuracy with the first seed, "
                        "e.g. 's2ft=1e-3,2e-3,4e-3;lora=1e-3,2e-3,4e-3;full=2e-5,5e-5,1e-4'")
    p.add_argument("--all-rates", nargs="?", const="all", default=None, metavar="METHODS",
                   help="with --lr-grid and several seeds: every seed trains every rate (a table per rate); "
                        "optionally only for these comma-separated methods")
    p.add_argument("--runs", default=None, metavar="FILE",
                   help="JSONL of finished runs: reused when their settings match, new ones appended")
    p.add_argument("--ffn-channels", type=int, default=104,
                   help="down_proj channels per layer of the s2ft-ffn method (channels only, no heads)")
    p.add_argument("--s2ft-strategy", default="random",
                   help="S²FT column selection: random, or weight|activation|gradient-largest|smallest")
    p.add_argument("--s2ft-budget", default=None, metavar="HEADS,CHANNELS",
                   help="S²FT heads and channels per layer instead of --ratio's half-and-half split")
    p.add_argument("--val", type=int, default=210, help="training rows held out as the validation split")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    grid = parse_grid(args.lr_grid) if args.lr_grid else {}
    methods = args.methods.split(",")
    torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    if not (data_dir / "train.jsonl").exists():
        generate(data_dir, 2000, 210, 0)
    base = load_model(None, dtype="float32", device="cpu")
    tok, pad_id = base.tokenizer, base.tokenizer.pad_token_id
    rows = D.load_examples(data_dir / "train.jsonl", tok, 64)
    records = [json.loads(line) for line in open(data_dir / "train.jsonl")]
    if args.val:  # the last `--val` training rows are held out for choosing learning rates
        rows, val_rows, val = rows[: -args.val], rows[-args.val:], records[-args.val:]
    else:
        val_rows, val = [], []
    general = [text_only(r, tok.eos_token_id) for r in D.load_examples(data_dir / "general.jsonl", tok, 256)]
    test = [json.loads(line) for line in open(data_dir / "test.jsonl")]
    acc, per_task = exact_match(base.model, tok, test)
    base_result = {"accuracy": acc, "per_task": per_task, "general_ppl": perplexity(base.model, general, pad_id)}
    del base
    data = Data(rows, val, val_rows, test, general, pad_id, base_result["general_ppl"],
                D.file_sha256(data_dir / "train.jsonl")[:16], load_runs(args.runs))
    started = time.perf_counter()
    sweep: dict[str, dict[float, dict]] = {}
    per_seed: dict[int, dict[str, dict]] = {s: {} for s in seeds}
    lrs = {m: getattr(args, "lr_" + m.replace("-", "_")) for m in methods}
    for m in methods:  # the first seed chooses each method's rate (if a grid is given) ...
        if m in grid:
            lrs[m], per_seed[seeds[0]][m] = choose_lr(m, grid[m], seeds[0], data, args, sweep)
        else:
            per_seed[seeds[0]][m] = run_one(m, lrs[m], seeds[0], data, args)
    for s in seeds[1:]:  # ... which every other seed then uses
        for m in methods:
            per_seed[s][m] = run_one(m, lrs[m], s, data, args)
    every_rate: dict[str, dict[float, dict]] = {}
    if args.all_rates:  # every other seed also trains the rates that were not chosen

        def result(m: str, lr: float, s: int) -> dict:
            if s == seeds[0]:
                return sweep[m][lr]
            return per_seed[s][m] if lr == lrs[m] else run_one(m, lr, s, data, args)

        wanted = methods if args.all_rates == "all" else args.all_rates.split(",")
        for m in (m for m in methods if m in grid and m in wanted):
            every_rate[m] = {lr: summarize({s: {m: result(m, lr, s)} for s in seeds})[m] for lr in grid[m]}
    summary = summarize(per_seed)
    if sweep:
        print_sweep(sweep, lrs)
    if every_rate:
        print_every_rate(every_rate, lrs, len(seeds))
    print_tables(base_result, per_seed, summary)
    print(json.dumps({"benchmark": "train_quality", "model": "SmolLM2-135M-Instruct", "dtype": "float32",
                      "steps": args.steps, "batch_size": args.batch_size, "seeds": seeds, "test_examples": len(test),
                      "val_examples": len(val), "general_tokens": sum(len(r.labels) for r in general),
                      "wall_s": time.perf_counter() - started, "chosen_lr": lrs, "base": base_result,
                      "summary": summary, "sweep": sweep, "every_rate": every_rate, "per_seed": per_seed}))


if __name__ == "__main__":
    main()

"""The optimisation loop over the deltas: batches, AdamW, schedule, accumulation, checkpoints.

Kept apart from `trainer.py` (which prepares the model, data and selection and writes the
adapter) so that each piece stays small. Every process runs the same loop; under torchrun the
model is wrapped in DistributedDataParallel, which averages the delta gradients only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from s2ft_serve.errors import ConflictError
from s2ft_serve.train import data as D
from s2ft_serve.train.checkpoint import Progress, latest_checkpoint, load_checkpoint, save_checkpoint
from s2ft_serve.train.config import TrainConfig
from s2ft_serve.train.sparse_linear import S2FTLinear

log = logging.getLogger(__name__)

LOSS_HISTORY = 10  # losses kept in checkpoints: the final training loss is their mean


@dataclass
class World:
    """This process's place among the torchrun processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def rank_batch(rows: list[D.Example], cfg: TrainConfig, world: World, micro: int, pad_id: int,
               device: torch.device) -> dict[str, torch.Tensor]:
    """The micro-batch number `micro` (over all epochs) for this process."""
    per_epoch = math.ceil(len(rows) / (cfg.batch_size * world.size))
    epoch, pos = divmod(micro, per_epoch)
    global_batch = D.batch_order(len(rows), cfg.batch_size * world.size, epoch, cfg.seed)[pos]
    while len(global_batch) < world.size:  # a short last batch: every process still gets a row
        global_batch = global_batch + global_batch
    mine = global_batch[world.rank:: world.size]
    return {k: v.to(device) for k, v in D.collate([rows[i] for i in mine], pad_id).items()}


def total_micro_batches(cfg: TrainConfig, num_rows: int, world: World) -> int:
    """The micro-batches the run trains: `--max-steps` whole steps, or `--epochs` passes over the data,
    whose last step takes only what is left (QA: it took the next epoch's batches, training rows twice)."""
    if cfg.max_steps is not None:
        return cfg.max_steps * cfg.grad_accum
    per_epoch = math.ceil(num_rows / (cfg.batch_size * world.size))
    return max(1, math.ceil(cfg.epochs * per_epoch))


def total_steps(cfg: TrainConfig, num_rows: int, world: World) -> int:
    return math.ceil(total_micro_batches(cfg, num_rows, world) / cfg.grad_accum)


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: list[D.Example], cfg: TrainConfig, world: World, pad_id: int,
             device: torch.device) -> float:
    """Token-weighted mean loss of `rows`, shared out over the processes."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, tokens]
    mine = list(range(world.rank, len(rows), world.size))
    for j in range(0, len(mine), cfg.batch_size):
        batch = {k: v.to(device) for k, v in D.collate([rows[i] for i in mine[j: j + cfg.batch_size]], pad_id).items()}
        n = D.label_tokens(batch)
        out = model(**batch)
        loss_sum += torch.tensor([float(out.loss) * n, n], dtype=torch.float64, device=device)
    if world.size > 1:
        dist.all_reduce(loss_sum)
    model.train(was_training)
    return float(loss_sum[0] / loss_sum[1].clamp(min=1))


def run_loop(cfg: TrainConfig, model: torch.nn.Module, layers: dict[str, S2FTLinear], rows: list[D.Example],
             val_rows: list[D.Example] | None, world: World, device: torch.device, pad_id: int,
             data_hashes: dict[str, str | None]) -> tuple[int, list[float]]:
    """Run the optimizer steps (resuming when asked); return the step count and recent losses.

    `data_hashes` (`{"data": sha256, "val_data": sha256 or None, "base_model_fingerprint": ...}`) goes into
    each checkpoint, so that a resume on other data or another base model is refused."""
    from tqdm.auto import tqdm

    params = [layer.delta for layer in layers.values()]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    net = model
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    micro_batches = total_micro_batches(cfg, len(rows), world)
    total = total_steps(cfg, len(rows), world)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total)
    ckpt_dir = Path(cfg.output) / "checkpoints"
    progress = Progress(step=0, losses=[])
    found = latest_checkpoint(ckpt_dir) if cfg.resume else None
    batching = {"global_batch": cfg.batch_size * world.size, "grad_accum": cfg.grad_accum,
                "max_length": cfg.max_length, "packing": cfg.packing, "rows": len(rows)}
    if cfg.resume and found is None and world.main:
        log.warning("--resume: no complete checkpoint in %s yet, so training starts at step 0", ckpt_dir)
    if found is not None:
        progress = load_checkpoint(found, layers, optimizer, data_hashes, batching)
        if progress.step > total:  # nothing would run, and the adapter would claim fewer steps than it had
            raise ConflictError(f"{found} is at step {progress.step}, beyond this run's {total} steps: raise "
                                "--max-steps (or --epochs), or train into another --output")
    bar = tqdm(total=total, initial=progress.step, disable=not (cfg.progress and world.main),
               desc="s2ft-train", unit="step", dynamic_ncols=True)
    started, seen_tokens = time.perf_counter(), 0
    for step in range(progress.step, total):
        # dropout's random numbers: a function of (seed, step, process), so a resumed run draws what an
        # uninterrupted one would, and the processes draw different masks (QA: neither held)
        torch.manual_seed((cfg.seed * 1_000_003 + step * 1_009 + world.rank) % 2**63)
        lr = cfg.learning_rate * lr_factor(step, total, warmup, cfg.lr_scheduler)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [rank_batch(rows, cfg, world, step * cfg.grad_accum + j, pad_id, device)
                   for j in range(min(cfg.grad_accum, micro_batches - step * cfg.grad_accum))]
        labelled = [D.label_tokens(b) for b in batches]
        # the step's loss is the mean over all its label tokens, on every process and micro-batch: each
        # micro-batch's mean loss weighs by its share of them (DDP then averages the processes' gradients,
        # hence the factor world.size), so accumulation and processes equal one batch of the same rows
        step_tokens = torch.tensor(float(sum(labelled)), dtype=torch.float64, device=device)
        if world.size > 1:
            dist.all_reduce(step_tokens)
        step_tokens = max(1.0, float(step_tokens))
        stats = torch.zeros(2, dtype=torch.float64, device=device)  # [loss, tokens]
        for j, (batch, n) in enumerate(zip(batches, labelled)):
            sync = world.size == 1 or j == len(batches) - 1  # a short last step too (QA: it never synced)
            with contextlib.nullcontext() if sync else net.no_sync():
                out = net(**batch)
                (out.loss * (n * world.size / step_tokens)).backward()
            stats += torch.tensor([float(out.loss.detach()) * n / step_tokens,
                                   float(batch["attention_mask"].sum())], dtype=torch.float64, device=device)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world.size > 1:
            dist.all_reduce(stats)  # the loss parts are shares of the step's tokens: their sum is the mean
        progress.step, loss = step + 1, float(stats[0])
        progress.losses = (progress.losses + [loss])[-LOSS_HISTORY:]
        progress.tokens += int(stats[1])
        seen_tokens += int(stats[1])
        rate = seen_tokens / max(1e-9, time.perf_counter() - started)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
        bar.update(1)
        if val_rows and cfg.eval_every and progress.step % cfg.eval_every == 0 and progress.step < total:
            val = evaluate(model, val_rows, cfg, world, pad_id, device)
            if world.main:
                bar.write(f"step {progress.step}: val_loss {val:.4f}")
        if cfg.save_every and progress.step % cfg.save_every == 0:
            if world.main:
                save_checkpoint(ckpt_dir, layers, optimizer, progress, cfg.keep_checkpoints, data_hashes, batching)
            if world.size > 1:
                dist.barrier()
    bar.close()
    return progress.step, list(progress.losses)

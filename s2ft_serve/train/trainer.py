"""The S²FT training loop: select columns, train only their deltas, write an adapter (format v1).

`train(TrainConfig)` loads the base model and data, chooses the columns (selection.py), swaps
the target Linears for `S2FTLinear` (sparse_linear.py), and runs AdamW over the deltas alone,
with warm-up + decay, gradient accumulation, clipping and periodic checkpoints. Under
`torchrun` it runs as DistributedDataParallel (gloo on CPU, nccl on CUDA): each process takes
its share of every global batch, and rank 0 writes checkpoints and the adapter.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from s2ft_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE, Adapter, ModuleDelta, make_config, save_adapter
from s2ft_serve.errors import ConflictError, InvalidRequestError
from s2ft_serve.model.loading import LoadedModel, load_model, resolve_device
from s2ft_serve.train import data as D
from s2ft_serve.train.checkpoint import refuse_earlier_run
from s2ft_serve.train.config import TrainConfig
from s2ft_serve.train.loop import World, evaluate, run_loop
from s2ft_serve.train.selection import Budget, Selection, budget_from_ratio, select
from s2ft_serve.train.sparse_linear import S2FTLinear, wrap_linears


@dataclass
class TrainResult:
    """What `train` returns: the adapter (also written to `path`) and the trained model."""

    path: Path
    adapter: Adapter
    model: torch.nn.Module  # the base with S2FTLinear layers, deltas trained (not merged)
    layers: dict[str, S2FTLinear]
    selection: Selection
    steps: int
    final_train_loss: float | None
    final_val_loss: float | None


def init_world(device: str) -> tuple[World, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), resolve_device(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size()), dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# what an --output may hold besides: this run's checkpoints, and (on --resume) the adapter it wrote
OUTPUT_FILES = ("checkpoints", CONFIG_FILE, WEIGHTS_FILE)


def prepare_output(cfg: TrainConfig) -> None:
    """Create `--output` and check it can be written, before the model loads: a bad path should cost
    seconds, not a whole training run. A folder holding anything else than a run's checkpoints and
    its adapter is refused (QA: a run into the base model's folder wrote an adapter there, and
    transformers then took the folder for a PEFT adapter), as is, unless resumed, one that already
    holds an adapter or checkpoints (which the new run would replace or mix with its own)."""
    out = Path(cfg.output)
    try:
        held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    except OSError:
        held = []  # unreadable: the write check below says so
    others = [n for n in held if n not in OUTPUT_FILES and not n.startswith(".adapter-")]  # a save's staging
    if others:
        raise ConflictError(f"--output {out} already holds other files ({', '.join(others[:5])}"
                            f"{', ...' if len(others) > 5 else ''}); choose a new or empty folder", param="output")
    files = [out / n for n in (CONFIG_FILE, WEIGHTS_FILE) if n in held]
    if any(not f.is_file() or f.is_symlink() for f in files):
        raise ConflictError(f"--output {out}: {', '.join(f.name for f in files)} must be regular files, which the "
                            "new adapter replaces", param="output")
    if not cfg.resume:
        refuse_earlier_run(out / "checkpoints")
        if files:
            raise ConflictError(f"--output {out} already holds an adapter; pass --resume to continue the run that "
                                "wrote it, or choose another --output", param="output")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise InvalidRequestError(f"--output {out}: cannot create or write this folder ({exc.strerror or exc})",
                                  param="output") from None


def data_hashes(cfg: TrainConfig) -> dict[str, str | None]:
    """The sha256 of the data files: recorded in checkpoints (a resume must see the same data) and the adapter."""
    return {"data": D.file_sha256(cfg.data), "val_data": D.file_sha256(cfg.val_data) if cfg.val_data else None}


def build_rows(cfg: TrainConfig, tokenizer, path: str, records: list[tuple[int, dict]]) -> list[D.Example]:
    examples = D.tokenize_records(path, records, tokenizer, cfg.max_length)
    return D.pack(examples, cfg.max_length) if cfg.packing else examples


def calibration_batches(rows: list[D.Example], pad_id: int, fraction: float, batch_size: int, seed: int,
                        device: torch.device | str = "cpu", least: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The activation / gradient strategies' sample: a seeded random `fraction` of `rows` (at least
    `least` rows, by default one batch), collated into batches of `batch_size` on `device`."""
    n = min(len(rows), max(least or batch_size, math.ceil(fraction * len(rows))))
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [{k: v.to(device) for k, v in D.collate([rows[i] for i in pick[j: j + batch_size]], pad_id).items()}
            for j in range(0, n, batch_size)]


def choose_columns(cfg: TrainConfig, model: torch.nn.Module, rows: list[D.Example], pad_id: int,
                   world: World) -> Selection:
    heads, channels = cfg.heads_per_layer, cfg.channels_per_layer
    if heads is None or channels is None:  # the ratio fills in what is not given
        ratio = budget_from_ratio(model, cfg.trainable_ratio, cfg.attention_share)
        heads = ratio.heads_per_layer if heads is None else heads
        channels = ratio.channels_per_layer if channels is None else channels
    budget = Budget(heads, channels)
    calibration = None
    if cfg.strategy in ("activation", "gradient"):
        # at least one global batch: the same sample as one process with the processes' batches together
        calibration = calibration_batches(rows, pad_id, cfg.calibration_fraction, cfg.batch_size, cfg.seed,
                                          next(model.parameters()).device, least=cfg.batch_size * world.size)
    selection = select(model, budget, cfg.strategy, cfg.order, cfg.seed, calibration)
    if world.size > 1:  # every process must train the same columns
        for name in sorted(selection.indices):
            idx = selection.indices[name].to(next(model.parameters()).device)
            dist.broadcast(idx, src=0)
            selection.indices[name] = idx.cpu()
    return selection


def finite_or_none(value: float | None) -> float | None:
    """A loss for the adapter's config: JSON has no NaN or infinity, and a config holding one is refused."""
    return value if value is not None and math.isfinite(value) else None


def make_adapter(loaded: LoadedModel, layers: dict[str, S2FTLinear], selection: Selection, cfg: TrainConfig,
                 data_hash: str, stats: dict) -> Adapter:
    save_dtype = getattr(torch, cfg.save_dtype)
    modules = {name: ModuleDelta(index=layer.index.detach().cpu().clone(),
                                 delta=layer.delta.detach().float().cpu().to(save_dtype, copy=True))
               for name, layer in layers.items()}
    config = make_config(
        loaded.name,
        loaded.fingerprint,
        selection=selection.describe(),
        seed=cfg.seed,
        training={"data": str(cfg.data), "data_sha256": data_hash, "val_data": cfg.val_data, **stats,
                  "learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                  "max_length": cfg.max_length, "packing": cfg.packing, "dtype": cfg.dtype,
                  "save_dtype": cfg.save_dtype},
    )
    return Adapter(config=config, modules=modules)


def save_output(adapter: Adapter, out: Path) -> None:
    """Write the adapter into `out` (beside its checkpoints) whole or not at all: both files are
    written to a folder inside it first, then moved in, the config last and an old one removed first,
    so that an interruption never pairs new weights with an old config (QA: a failed config write left
    new weights and no config, the training lost)."""
    staged = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out))
    try:
        save_adapter(adapter, staged)
        (out / CONFIG_FILE).unlink(missing_ok=True)
        os.replace(staged / WEIGHTS_FILE, out / WEIGHTS_FILE)
        os.replace(staged / CONFIG_FILE, out / CONFIG_FILE)
    except OSError as exc:
        raise InvalidRequestError(f"--output {out}: could not write the adapter ({exc.strerror or exc}); "
                                  f"what was written is kept in {staged}", param="output") from None
    staged.rmdir()


def train(cfg: TrainConfig) -> TrainResult:
    """Train an S²FT adapter as `cfg` says and write it to `cfg.output`."""
    cfg.validate()
    train_records = D.read_records(cfg.data)  # malformed data is refused before anything is written
    val_records = D.read_records(cfg.val_data) if cfg.val_data else None
    hashes = data_hashes(cfg)
    prepare_output(cfg)
    world, device = init_world(cfg.device)
    seed_everything(cfg.seed)
    loaded = load_model(cfg.model, dtype=cfg.dtype, device=str(device))
    tok = loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rows = build_rows(cfg, tok, cfg.data, train_records)
    # validation examples are scored each on its own, never packed: with packing, an example would be
    # scored after the previous ones, a loss no served request reproduces
    val_rows = D.tokenize_records(cfg.val_data, val_records, tok, cfg.max_length) if val_records else None
    model = loaded.model
    selection = choose_columns(cfg, model, rows, pad_id, world)
    layers = wrap_linears(model, selection.indices)
    model.train()
    steps, losses = run_loop(cfg, model, layers, rows, val_rows, world, device, pad_id,
                             {**hashes, "base_model_fingerprint": loaded.fingerprint})
    final_train = sum(losses) / len(losses) if losses else None
    final_val = evaluate(model, val_rows, cfg, world, pad_id, device) if val_rows else None
    stats = {"steps": steps, "final_train_loss": finite_or_none(final_train),
             "final_val_loss": finite_or_none(final_val), "train_rows": len(rows), "world_size": world.size}
    adapter = make_adapter(loaded, layers, selection, cfg, hashes["data"], stats)
    path = Path(cfg.output)
    if world.main:
        save_output(adapter, path)
    if world.size > 1:
        dist.barrier()
    model.eval()
    return TrainResult(path=path, adapter=adapter, model=model, layers=layers, selection=selection, steps=steps,
                       final_train_loss=final_train, final_val_loss=final_val)

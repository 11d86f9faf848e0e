"""Training checkpoints without pickle: deltas, AdamW state and progress in safetensors + JSON.

A checkpoint is a folder `OUTPUT/checkpoints/step-N/` holding `state.safetensors` (for each
adapted module its index, delta and AdamW moments) and `state.json` (step, optimizer scalars,
train-loss history, the sha256 of the data files, the base model's fingerprint, the batching).
`state.json` is written last, and whole (a temporary file renamed), so a folder without a readable
one is incomplete and is ignored on resume. One checkpoints folder holds one run only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from s2ft_serve.errors import ConflictError, InvalidRequestError
from s2ft_serve.train.sparse_linear import S2FTLinear

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
STEP_FOLDER = re.compile(r"step-([0-9]+)", re.ASCII)  # a checkpoint's folder name
log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where training stands: the next optimizer step to run and recent losses."""

    step: int = 0
    losses: list[float] | None = None
    tokens: int = 0


def save_checkpoint(folder: Path, layers: dict[str, S2FTLinear], optimizer: torch.optim.Optimizer,
                    progress: Progress, keep: int, data_hashes: dict[str, str | None],
                    batching: dict[str, int] | None = None) -> Path:
    """`data_hashes` holds the data files' sha256 ("data", "val_data") and the base model's
    "base_model_fingerprint"; `batching` ({"global_batch": rows per micro-batch over all processes,
    "grad_accum", "max_length", "packing", "rows"}) is recorded so that a resume on another base or with
    another layout, which would not continue the same run, is refused."""
    from safetensors.torch import save_file

    target = folder / f"step-{progress.step}"
    target.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for name, layer in layers.items():
        tensors[f"{name}.index"] = layer.index.detach().cpu().contiguous()
        tensors[f"{name}.delta"] = layer.delta.detach().cpu().contiguous()
        state = optimizer.state.get(layer.delta, {})
        if "exp_avg" in state:
            tensors[f"{name}.exp_avg"] = state["exp_avg"].detach().cpu().contiguous()
            tensors[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().contiguous()
            steps[name] = float(state["step"])
    save_file(tensors, str(target / STATE_TENSORS))
    _sync(target / STATE_TENSORS)  # on disk before the state.json that vouches for it (a crash, a power cut)
    meta = {"step": progress.step, "losses": progress.losses or [], "tokens": progress.tokens, "adam_steps": steps,
            "data_sha256": {k: data_hashes.get(k) for k in ("data", "val_data")},
            "base_model_fingerprint": data_hashes.get("base_model_fingerprint"), "batching": batching}
    partial = target / (STATE_JSON + ".tmp")  # whole or not at all (QA: a torn one blocked --resume)
    partial.write_text(json.dumps(meta))
    _sync(partial)
    os.replace(partial, target / STATE_JSON)
    _prune(folder, keep)
    return target


def _sync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _prune(folder: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove the older ones, and any incomplete folder older
    than the newest complete one (QA: those cut short were never removed)."""
    done = sorted(complete_checkpoints(folder), key=_step_of)
    kept = set(done[-max(1, keep):])
    for old in _step_folders(folder):
        if old not in kept and done and _step_of(old) < _step_of(done[-1]):
            shutil.rmtree(old, ignore_errors=True)


def _step_folders(folder: Path) -> list[Path]:
    """The checkpoint folders `step-N` (ASCII digits: QA, `step-²` passed `isdigit` and failed `int`)."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if STEP_FOLDER.fullmatch(p.name) and p.is_dir()]


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def complete_checkpoints(folder: Path, warn: bool = False) -> list[Path]:
    """The checkpoints whose `state.json` is there and whole; with `warn`, each one skipped is logged."""
    return [p for p in _step_folders(folder) if _readable(p / STATE_JSON, warn)]


def _readable(state: Path, warn: bool = False) -> bool:
    """Whether a checkpoint's `state.json` is there and whole (one cut short by a crash before the write
    became atomic, or by a full disk, or never written, the run stopped first, is skipped with a warning
    on resume)."""
    if not state.is_file():
        if warn:
            log.warning("%s has no %s (cut short before it was written): that checkpoint is skipped",
                        state.parent, STATE_JSON)
        return False
    try:
        json.loads(state.read_text())
    except (OSError, ValueError, RecursionError):
        if warn:
            log.warning("%s is unreadable: that checkpoint is skipped", state)
        return False
    return True


def refuse_earlier_run(folder: Path) -> None:
    """A fresh run must not share `folder` with an earlier run's checkpoints: pruning by step number
    would delete the new run's checkpoints in favour of the old ones, and a later --resume would
    silently continue the old run."""
    done = sorted(_step_folders(folder), key=_step_of)  # complete or not (QA: one cut short was overlooked)
    if done:
        raise ConflictError(
            f"{folder} already holds checkpoints of an earlier run ({', '.join(p.name for p in done)}); pass "
            "--resume to continue that run, or choose another --output")


def latest_checkpoint(folder: Path) -> Path | None:
    done = complete_checkpoints(folder, warn=True)
    return max(done, key=_step_of) if done else None


def _check_same_data(path: Path, meta: dict, data_hashes: dict[str, str | None]) -> None:
    """Refuse to continue a run on other data: the data order would no longer be the one it began."""
    recorded = meta.get("data_sha256")
    if recorded is None:  # written before checkpoints recorded their data: stays resumable
        return
    for key, flag in (("data", "--data"), ("val_data", "--val-data")):
        if recorded.get(key) != data_hashes.get(key):
            raise InvalidRequestError(
                f"{path}: checkpoint was trained with a different {flag} file (sha256 differs); resume with "
                "the same data, or start a fresh run with another --output")
    base = meta.get("base_model_fingerprint")  # absent from older checkpoints
    if base is not None and data_hashes.get("base_model_fingerprint") not in (None, base):
        raise InvalidRequestError(  # QA: deltas learnt on one base went on training on another of its shapes
            f"{path}: checkpoint was trained on another base model (fingerprint {base}, this --model has "
            f"{data_hashes['base_model_fingerprint']}); resume with the same --model, or start a fresh run")


def _check_same_batching(path: Path, meta: dict, batching: dict[str, int] | None) -> None:
    recorded = meta.get("batching")
    if recorded is None or batching is None:  # written before checkpoints recorded it: stays resumable
        return
    differ = [k for k in recorded if k in batching and recorded[k] != batching[k]]  # older ones record fewer
    if differ:
        said = ", ".join(f"{k.replace('_', ' ')} {recorded[k]}" for k in differ)
        now = ", ".join(f"{k.replace('_', ' ')} {batching[k]}" for k in differ)
        raise InvalidRequestError(
            f"{path}: checkpoint was trained with {said} (from --batch-size x processes, --grad-accum, "
            f"--max-length, --packing and the data), this run has {now}: the data order would not continue; "
            "resume with the same layout, or start a fresh run")


def load_checkpoint(path: Path, layers: dict[str, S2FTLinear], optimizer: torch.optim.Optimizer,
                    data_hashes: dict[str, str | None], batching: dict[str, int] | None = None) -> Progress:
    """Restore deltas and AdamW moments into `layers` / `optimizer`; the data, batching and selection
    (every module's columns, and no module more or less) must match. A damaged checkpoint (a key or a
    tensor missing, a truncated file) is one clear error naming it (QA: KeyError and SafetensorError
    tracebacks)."""
    from safetensors import SafetensorError

    try:
        return _load_checkpoint(path, layers, optimizer, data_hashes, batching)
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError, OSError, RuntimeError,
            SafetensorError) as exc:
        raise InvalidRequestError(f"{path}: a damaged checkpoint ({type(exc).__name__}: {exc}); remove that folder "
                                  "to resume from the one before it") from None


def _load_checkpoint(path: Path, layers: dict[str, S2FTLinear], optimizer: torch.optim.Optimizer,
                     data_hashes: dict[str, str | None], batching: dict[str, int] | None) -> Progress:
    from safetensors.torch import load_file

    meta = json.loads((path / STATE_JSON).read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"{STATE_JSON} holds a JSON {type(meta).__name__}, not an object")
    step, losses = meta["step"], [float(x) for x in meta["losses"]]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{STATE_JSON} records step {step!r}, not a whole number")
    _check_same_data(path, meta, data_hashes)
    _check_same_batching(path, meta, batching)
    tensors = load_file(str(path / STATE_TENSORS))
    trained = {key.removesuffix(".index") for key in tensors if key.endswith(".index")}
    if trained != set(layers):
        differ = sorted(trained ^ set(layers))
        raise InvalidRequestError(
            f"{path}: checkpoint trained other modules than this run would ({', '.join(differ[:4])}"
            f"{', ...' if len(differ) > 4 else ''}); resume with the same model, selection options and seed")
    with torch.no_grad():
        for name, layer in layers.items():
            index = tensors.get(f"{name}.index")
            if index is None or not torch.equal(index, layer.index.cpu()):
                raise InvalidRequestError(
                    f"{path}: checkpoint selected different columns for {name}; resume with the same "
                    "model, selection options and seed")
            shape = layer.delta.shape
            moments = [f"{name}.exp_avg", f"{name}.exp_avg_sq"] if name in meta["adam_steps"] else []
            for key in [f"{name}.delta", *moments]:  # else a wrong shape failed only at the first step
                if tensors[key].shape != shape:
                    raise ValueError(f"{key} has shape {list(tensors[key].shape)}, the run's delta {list(shape)}")
            layer.delta.copy_(tensors[f"{name}.delta"])
            if moments:
                dev, dtype = layer.delta.device, layer.delta.dtype
                optimizer.state[layer.delta] = {
                    "step": torch.tensor(float(meta["adam_steps"][name])),
                    "exp_avg": tensors[moments[0]].to(dev, dtype),
                    "exp_avg_sq": tensors[moments[1]].to(dev, dtype),
                }
    return Progress(step=step, losses=losses, tokens=int(meta.get("tokens", 0)))

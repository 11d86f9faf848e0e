"""`TrainConfig`: every option of the trainer, shared by `s2ft-train` and `train(TrainConfig)`.

Each field carries its command-line help in `metadata["help"]`; the CLI is generated from the
fields, so the command line and the Python API always take the same options.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

from s2ft_serve.errors import InvalidRequestError


DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32"}  # accepted on input, never recorded
EPOCH_SEED_STRIDE = 100_003  # data.batch_order seeds epoch e's order with seed * EPOCH_SEED_STRIDE + e
MAX_SEED = 2**63 // EPOCH_SEED_STRIDE  # so that seed fits torch's 64-bit generator seed
# AdamW's step is the learning rate over 1 - beta1 ** t (down to 2 ** -53), in float32 (at most 3.4e38):
# a learning rate of 100 keeps it finite (QA: 1e38 overflowed inside AdamW, a RuntimeError traceback)
MAX_LEARNING_RATE = 100
# the step count, epochs x batches per epoch, must be a finite whole number (QA: 1e308 epochs overflowed
# converting it to one, after the model had loaded)
MAX_EPOCHS = 1_000_000
RANGE_REASONS = {  # said after a range, where the range alone does not explain itself
    "learning_rate": f" (above {MAX_LEARNING_RATE}, AdamW's float32 step can overflow; usual rates are 1e-5 to 1e-2)",
    "epochs": f" (at most {MAX_EPOCHS:,} passes, so that the step count stays a finite whole number; "
              "or give --max-steps)",
}
PATH_FIELDS = ("data", "val_data", "model", "output")  # recorded in the adapter's config as text


def opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    data: str = opt("", "training data, JSONL: {prompt, completion}, {messages} or {text} per line (required)")
    output: str = opt("", "folder to write the adapter to (format v1); checkpoints go to OUTPUT/checkpoints (required)")
    model: str | None = opt(None, "base model folder (Llama family); default: the embedded SmolLM2-135M-Instruct")
    val_data: str | None = opt(None, "optional validation JSONL, same formats; its loss is reported and recorded")
    # selection
    strategy: str = opt("random", "column selection: random, weight, activation or gradient",
                        choices=("random", "weight", "activation", "gradient"))
    order: str = opt("largest", "for weight/activation/gradient: keep the largest or smallest scores "
                     "(activation + smallest forgot least in the README's benchmark)",
                     choices=("largest", "smallest"))
    heads_per_layer: int | None = opt(None, "attention (query) heads trained per layer: all head_dim columns of o_proj each")
    channels_per_layer: int | None = opt(None, "FFN channels trained per layer: one down_proj column each")
    trainable_ratio: float = opt(0.01, "budget as a fraction of all model parameters, split by --attention-share "
                                       "and uniform across layers; used for whichever of "
                                       "--heads-per-layer / --channels-per-layer is not given")
    attention_share: float = opt(0.5, "share of the --trainable-ratio budget for attention heads, the rest for FFN "
                                      "channels: 0.5 is the paper's advice; 0 trains down_proj channels only, as the "
                                      "authors' Llama 3 scripts do")
    calibration_fraction: float = opt(0.01, "share of the training rows used to score columns for the "
                                            "activation / gradient strategies (at least one batch)")
    # optimisation
    learning_rate: float = opt(2e-4, "peak AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay (applied to the deltas)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    lr_scheduler: str = opt("cosine", "learning-rate decay after warm-up: cosine, linear or constant",
                            choices=("cosine", "linear", "constant"))
    warmup_steps: int | None = opt(None, "linear warm-up steps (default: --warmup-ratio of all steps)")
    warmup_ratio: float = opt(0.03, "warm-up as a fraction of all optimizer steps, when --warmup-steps is not given")
    epochs: float = opt(1.0, "passes over the training data (ignored when --max-steps is given)")
    max_steps: int | None = opt(None, "optimizer steps to run (overrides --epochs)")
    batch_size: int = opt(8, "rows per micro-batch on each process")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)")
    max_length: int = opt(1024, "maximum tokens per row; longer examples are truncated")
    packing: bool = opt(False, "pack examples into rows of exactly --max-length tokens instead of padding")
    dtype: str = opt("float32", "base model dtype: float32 or bfloat16 (deltas and optimizer state stay float32)",
                     choices=("float32", "bfloat16", "fp32", "bf16"))
    save_dtype: str = opt("float32", "dtype of the saved deltas: float32 (as trained) or bfloat16 (each delta "
                          "rounded once: half the file, and a float32 engine's mixed decode steps read half the bytes)",
                          choices=("float32", "bfloat16"))
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (under torchrun: cuda:LOCAL_RANK when CUDA is present)")
    seed: int = opt(42, "seed for selection, data order and initialisation")
    # bookkeeping
    save_every: int = opt(0, "write a checkpoint every N optimizer steps (0: none until the end)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep")
    resume: bool = opt(False, "resume from the latest checkpoint in OUTPUT/checkpoints")
    eval_every: int = opt(0, "compute the validation loss every N steps (0: only at the end)")
    progress: bool = opt(True, "show a progress bar (step, loss, tokens per second)")

    def __post_init__(self) -> None:
        # one spelling downstream: the adapter's config records "bfloat16", never "bf16"
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        for name in PATH_FIELDS:  # paths as text: the adapter's config records them
            if isinstance(getattr(self, name), os.PathLike):  # (QA: a Path val_data trained, then could not save)
                setattr(self, name, os.fspath(getattr(self, name)))

    def validate(self) -> None:
        """Refuse inconsistent options before anything is loaded."""
        if not self.data:
            raise InvalidRequestError("a training data file is required (--data)")
        if not self.output:
            raise InvalidRequestError("an output folder is required (--output)")
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "max_length": self.max_length}
        for name, value in positive.items():
            if value < 1:
                raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidRequestError(f"--max-steps must be at least 1, got {self.max_steps}")
        # (field, lowest, highest, lowest allowed, highest allowed); NaN fails every comparison
        ranges = [("learning_rate", 0, MAX_LEARNING_RATE, False, True), ("weight_decay", 0, math.inf, True, False),
                  ("adam_beta1", 0, 1, True, False), ("adam_beta2", 0, 1, True, False),
                  ("adam_eps", 0, math.inf, True, False), ("warmup_ratio", 0, 1, True, True),
                  ("max_grad_norm", 0, math.inf, True, False)]
        if self.warmup_steps is not None:
            ranges.append(("warmup_steps", 0, math.inf, True, False))
        if self.max_steps is None:  # --epochs counts only then
            ranges.append(("epochs", 0, MAX_EPOCHS, False, True))
        for name, low, high, with_low, with_high in ranges:
            value = getattr(self, name)
            if not ((low <= value if with_low else low < value) and (value <= high if with_high else value < high)):
                span = f"{'[' if with_low else '('}{low}, {high}{']' if with_high else ')'}"
                why = RANGE_REASONS.get(name, "")
                raise InvalidRequestError(f"--{name.replace('_', '-')} must lie in {span}, got {value}{why}")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise InvalidRequestError(f"--{name.replace('_', '-')} must be 0 (off) or positive, got "
                                          f"{getattr(self, name)}")
        from s2ft_serve.adapters.format import is_utf8, printable

        for name in PATH_FIELDS:  # the adapter's config must be text (QA: refused only when saving, after the
            value = getattr(self, name)  # whole run), and the engine and safetensors read only UTF-8 paths
            if value is not None and not is_utf8(value):
                raise InvalidRequestError(f"--{name.replace('_', '-')} {printable(value)}: not valid UTF-8; the adapter's config "
                                          f"records paths as text, and the engine reads only UTF-8 paths")
        if self.keep_checkpoints < 1:
            raise InvalidRequestError(f"--keep-checkpoints must be at least 1, got {self.keep_checkpoints}")
        self._check_device()
        if not 0 <= self.seed < MAX_SEED:  # QA: a larger one failed at the first batch, after the model loaded
            raise InvalidRequestError(f"--seed must lie in [0, {MAX_SEED}), got {self.seed}")
        for name in ("heads_per_layer", "channels_per_layer"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise InvalidRequestError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if (self.heads_per_layer is None or self.channels_per_layer is None) and not 0 < self.trainable_ratio <= 1:
            # used only for a count not given (QA: refused when unused, and only once the model had loaded)
            raise InvalidRequestError(f"--trainable-ratio must lie in (0, 1], got {self.trainable_ratio}")
        if not 0 <= self.attention_share <= 1:
            raise InvalidRequestError(f"--attention-share must lie in [0, 1], got {self.attention_share}")
        if not 0 < self.calibration_fraction <= 1:
            raise InvalidRequestError(f"--calibration-fraction must lie in (0, 1], got {self.calibration_fraction}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise InvalidRequestError(
                    f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")

    def _check_device(self) -> None:
        """A device this machine has, before the model loads (torch's own errors come only after)."""
        import torch

        if self.device == "auto":
            return
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise InvalidRequestError(f"--device must be cpu, cuda, cuda:N or auto, got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidRequestError(f"--device {self.device}: no CUDA device is available here")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidRequestError(f"--device {self.device}: this machine has {torch.cuda.device_count()} GPU(s)")
        if device.type not in ("cpu", "cuda"):
            raise InvalidRequestError(f"--device must be cpu, cuda, cuda:N or auto, got {self.device!r}")

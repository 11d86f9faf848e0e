"""Create the random adapters a load test needs, in format v1, for a given base model.

The budget is S²FT's: `heads` attention heads (o_proj columns) and `channels` FFN channels
(down_proj columns) per layer. Deltas are random (seeded by the adapter's name), small enough
to keep text fluent yet large enough that adapters give different greedy tokens. Existing
folders are kept, so a sweep only writes the adapters it lacks.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

from loadtest.errors import LoadtestConfigError


@dataclass(frozen=True)
class AdapterBudget:
    heads: int = 1  # o_proj heads per layer
    channels: int = 16  # down_proj channels per layer
    scale: float = 0.02  # standard deviation of the random deltas
    dtype: str = "float32"  # storage dtype of the deltas

    def validate(self) -> None:
        if self.heads < 0 or self.channels < 0 or self.heads + self.channels == 0:
            raise LoadtestConfigError("an adapter needs heads or channels per layer (neither negative, not both 0)")
        if not self.scale > 0:
            raise LoadtestConfigError("the delta scale must be positive")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise LoadtestConfigError(f"delta dtype {self.dtype!r}: choose float32, bfloat16 or float16")


def adapter_names(count: int, prefix: str = "lt-") -> list[str]:
    """The names of a load test's adapters: lt-0000, lt-0001, ... (sorted = popularity rank)."""
    return [f"{prefix}{i:04d}" for i in range(count)]


def create_adapters(
    root: str | Path,
    names: list[str],
    model: str | None = None,
    budget: AdapterBudget = AdapterBudget(),
    seed_offset: int = 0,
) -> list[Path]:
    """Write `root/<name>` for every name that has no adapter yet; return all the folders.

    `model` is the base model (None: the embedded default); adapters record its name and
    fingerprint so the server accepts them. `seed_offset` gives a second, different set of
    weights under the same names (chaos mode's replacements).
    """
    budget.validate()
    root = Path(root)
    folders = [root / name for name in names]
    missing = [(i, f) for i, f in enumerate(folders) if not (f / "adapter_config.json").is_file()]
    if missing:
        _write(missing, names, model, budget, seed_offset)
    return folders


def _write(missing: list[tuple[int, Path]], names: list[str], model: str | None, budget: AdapterBudget,
           seed_offset: int) -> None:
    from s2ft_serve.adapters.format import save_adapter
    from s2ft_serve.model.loading import load_model, resolve_dtype
    from s2ft_serve.model.testing import random_adapter

    from s2ft_serve.errors import S2FTError

    try:
        loaded = load_model(model, dtype="float32", device="cpu")
    except S2FTError as exc:
        raise LoadtestConfigError(exc.message) from None
    heads_available = loaded.model.config.num_attention_heads
    if budget.heads > heads_available:
        raise LoadtestConfigError(f"{budget.heads} heads per layer: the base model has {heads_available}")
    channels_available = loaded.model.config.intermediate_size
    if budget.channels > channels_available:
        raise LoadtestConfigError(f"{budget.channels} channels per layer: the base model has {channels_available}")
    dtype = resolve_dtype(budget.dtype)
    for i, folder in missing:
        seed = _seed_of(names[i]) + seed_offset
        adapter = random_adapter(loaded.model, loaded.name, seed=seed, heads=budget.heads,
                                 channels=budget.channels, scale=budget.scale, fingerprint=loaded.fingerprint)
        for module in adapter.modules.values():
            module.delta = module.delta.to(dtype)
        adapter.config["loadtest"] = {"heads": budget.heads, "channels": budget.channels, "seed": seed}
        save_adapter(adapter, folder)


def _seed_of(name: str) -> int:
    """A stable seed per name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode()) % (2**31)


def adapter_parameters(folder: str | Path) -> int:
    """Trainable parameters of one adapter folder (for reports)."""
    from s2ft_serve.adapters.format import load_adapter

    return load_adapter(folder).num_parameters()

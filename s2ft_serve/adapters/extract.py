"""Extract an S²FT adapter from a fully fine-tuned checkpoint by diffing it against its base.

The tuned checkpoint must differ from the base only in columns of `o_proj` / `down_proj`;
those columns become the adapter (`delta = W_tuned[:, index] - W_base[:, index]`). Any other
weight that differs by more than the tolerance is refused, naming the tensors.

Checkpoints saved by the S²FT authors' reference code are accepted too: it permutes each
layer's heads and FFN channels (selected ones first) before training and saves the merged
model in that order. The permutation is recovered from the untrained `q_proj`/`k_proj` rows
and `gate_proj` rows (see `permutation.py`), undone, checked against the base, and reported.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from s2ft_serve.adapters.format import (
    Adapter,
    ModuleDelta,
    make_config,
    save_adapter,
)
from s2ft_serve.adapters.interop import CheckpointTensors, atomic_dir, check_output_dir
from s2ft_serve.adapters.permutation import (
    LayerPermutation,
    consistent_gqa,
    describe,
    is_identity,
    match_blocks,
    unpermute,
)
from s2ft_serve.errors import InvalidRequestError
from s2ft_serve.model.loading import LoadedModel, head_dim_of, load_model, target_linears

PERMUTATION_FILE = "s2ft_permutation.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved
DEFAULT_TOLERANCE = 1e-6


@dataclass
class ExtractReport:
    out_dir: Path
    base_model: str
    tuned: str
    modules: int
    parameters: int
    max_unchanged_diff: float  # the largest difference found in weights that must be unchanged
    permutations: dict[int, LayerPermutation] = field(default_factory=dict)  # layers not in base order

    @property
    def permuted(self) -> bool:
        return bool(self.permutations)

    def permutation_summary(self) -> dict:
        """Per permuted layer: how many heads / kv heads / channels moved (and the first moves)."""
        return {
            str(layer): {kind: describe(order) for kind, order in asdict(perm).items() if order is not None}
            for layer, perm in sorted(self.permutations.items())
        }


@dataclass
class Geometry:
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "Geometry":
        heads = config.num_attention_heads
        return cls(heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=head_dim_of(config))


@dataclass
class LayerNames:
    """Module names of one decoder layer (without `.weight` / `.bias`)."""

    index: int
    q: str
    k: str
    v: str
    o: str
    gate: str
    up: str
    down: str

    @classmethod
    def from_o_proj(cls, index: int, o_proj: str) -> "LayerNames":
        layer = o_proj.rsplit(".", 2)[0]  # "model.layers.3"
        attn, mlp = f"{layer}.self_attn.", f"{layer}.mlp."
        return cls(index, attn + "q_proj", attn + "k_proj", attn + "v_proj", attn + "o_proj",
                   mlp + "gate_proj", mlp + "up_proj", mlp + "down_proj")


def extract_adapter(base_path: str | os.PathLike | None, tuned_path: str | os.PathLike,
                    out_dir: str | os.PathLike, tolerance: float = DEFAULT_TOLERANCE) -> ExtractReport:
    """Diff `tuned_path` against `base_path` and write the changed columns as an adapter at `out_dir`."""
    if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise InvalidRequestError(f"tolerance must be a finite number >= 0, got {tolerance!r}", param="tolerance")
    out = Path(out_dir)
    check_output_dir(out)
    base = load_model(base_path, dtype=None)
    tuned = CheckpointTensors(tuned_path)
    linears = target_linears(base.model)
    base_sd = base.model.state_dict()
    keys = _keys_to_compare(base_sd, tuned)
    layers = [LayerNames.from_o_proj(i, name) for i, name in enumerate(n for n in linears if n.endswith("o_proj"))]
    geometry = Geometry.of(base.model.config)
    permutations = {ln.index: _recover_layer(ln, base_sd, tuned, geometry, tolerance) for ln in layers}
    permutations = {i: p for i, p in permutations.items() if not p.is_identity}
    moves = _tensor_moves(layers, permutations, geometry.head_dim)
    modules, max_unchanged = _diff(keys, base_sd, tuned, moves, set(linears), tolerance)
    adapter = _make_adapter(base, tuned.path, modules, tolerance, sorted(permutations))
    with atomic_dir(out) as tmp:
        save_adapter(adapter, tmp)
        if permutations:
            _write_permutations(tmp / PERMUTATION_FILE, permutations)
    return ExtractReport(out_dir=out, base_model=base.name, tuned=str(tuned.path), modules=len(modules),
                         parameters=adapter.num_parameters(), max_unchanged_diff=max_unchanged,
                         permutations=permutations)


def _keys_to_compare(base_sd: dict[str, torch.Tensor], tuned: CheckpointTensors) -> list[str]:
    """Base tensor names to compare; refuses missing or foreign tensors (tied copies may be absent)."""
    present = {k for k in base_sd if k in tuned}
    stored_at = {base_sd[k].data_ptr() for k in present}
    missing = [k for k in base_sd if k not in tuned and base_sd[k].data_ptr() not in stored_at]
    foreign = [k for k in tuned.keys() if k not in base_sd and not k.endswith(IGNORED_SUFFIXES)]
    if missing:
        raise InvalidRequestError(f"{tuned.path}: lacks tensor(s) of the base model: {_first(missing)}; "
                                  "is it a fine-tune of this base?")
    if foreign:
        raise InvalidRequestError(f"{tuned.path}: holds tensor(s) the base model lacks: {_first(foreign)}; "
                                  "is it a fine-tune of this base?")
    return sorted(present)


def _recover_layer(names: LayerNames, base_sd: dict[str, torch.Tensor], tuned: CheckpointTensors,
                   geometry: Geometry, tolerance: float) -> LayerPermutation:
    """Find the head and channel permutation of one layer from rows S²FT never trains."""
    # rows are matched on every tensor that moves with them and S²FT never trains (QA: channels matched on
    # gate_proj alone were mixed up where two channels' gate rows are equal, e.g. dead or pruned ones)
    heads = _match([names.q], base_sd, tuned, geometry.head_dim, tolerance, "query heads")
    kv_heads = _match([names.k, names.v], base_sd, tuned, geometry.head_dim, tolerance, "key/value heads")
    if not consistent_gqa(heads, kv_heads, geometry.heads // geometry.kv_heads):
        raise InvalidRequestError(
            f"{tuned.path}: layer {names.index}: the query heads and key/value heads are permuted "
            "inconsistently (a query head no longer reads its own key/value head), so this is not a "
            "reordering of the base model"
        )
    channels = _match([names.gate, names.up], base_sd, tuned, 1, tolerance, "FFN channels")
    return LayerPermutation(heads=None if is_identity(heads) else heads,
                            kv_heads=None if is_identity(kv_heads) else kv_heads,
                            channels=None if is_identity(channels) else channels)


def _match(modules: list[str], base_sd: dict[str, torch.Tensor], tuned: CheckpointTensors, block: int,
           tolerance: float, what: str) -> list[int]:
    """The order of `modules`' output rows (in blocks of `block`) in the tuned checkpoint, matched on all of
    their weights side by side (they are permuted together)."""
    keys = [m + ".weight" for m in modules]
    tuned_weights, base_weights = [tuned.get(k) for k in keys], [base_sd[k] for k in keys]
    order = None
    if all(t.shape == b.shape for t, b in zip(tuned_weights, base_weights)) and \
            len({b.shape[0] for b in base_weights}) == 1:
        order = match_blocks(torch.cat([t.reshape(t.shape[0], -1) for t in tuned_weights], dim=1),
                             torch.cat([b.reshape(b.shape[0], -1) for b in base_weights], dim=1), block, tolerance)
    if order is None:
        names = " and ".join(f"'{k}'" for k in keys)
        raise InvalidRequestError(
            f"{tuned.path}: tensor{'s' if len(keys) > 1 else ''} {names} changed beyond the tolerance {tolerance:g}: "
            f"their rows are not a reordering of the base's, so the {what} cannot be matched. S²FT adapters only "
            "change o_proj/down_proj columns; this checkpoint was fine-tuned in another way"
        )
    return order


def _tensor_moves(layers: list[LayerNames], permutations: dict[int, LayerPermutation],
                  head_dim: int) -> dict[str, tuple[list[int], int, int]]:
    """For each tensor to un-permute: (order, dim, block)."""
    moves: dict[str, tuple[list[int], int, int]] = {}
    for names in layers:
        perm = permutations.get(names.index)
        if perm is None:
            continue
        plan = [(perm.heads, [names.q], 0, head_dim), (perm.kv_heads, [names.k, names.v], 0, head_dim),
                (perm.heads, [names.o], 1, head_dim), (perm.channels, [names.gate, names.up], 0, 1),
                (perm.channels, [names.down], 1, 1)]
        for order, modules, dim, block in plan:
            if order is None:
                continue
            for module in modules:
                moves[module + ".weight"] = (order, dim, block)
                if dim == 0:
                    moves[module + ".bias"] = (order, 0, block)
    return moves


def _diff(keys: list[str], base_sd: dict[str, torch.Tensor], tuned: CheckpointTensors,
          moves: dict[str, tuple[list[int], int, int]], targets: set[str],
          tolerance: float) -> tuple[dict[str, ModuleDelta], float]:
    """Changed target columns become deltas; any other change beyond the tolerance is refused."""
    modules: dict[str, ModuleDelta] = {}
    changed: list[str] = []
    max_unchanged = 0.0
    for key in keys:
        base_t, tuned_t = base_sd[key], tuned.get(key)
        if tuned_t.shape != base_t.shape:
            raise InvalidRequestError(f"{tuned.path}: tensor '{key}' has shape {list(tuned_t.shape)}, "
                                      f"the base has {list(base_t.shape)}")
        if key in moves:
            tuned_t = unpermute(tuned_t, *moves[key])
        diff = tuned_t.to(torch.float32) - base_t.to(torch.float32)
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module in targets:
            if not torch.isfinite(diff).all():  # NaN > tolerance is False: such a column was left out (QA)
                raise InvalidRequestError(f"{tuned.path}: tensor '{key}' differs from the base by values that "
                                          "are not finite (NaN or infinity)")
            columns = torch.nonzero(diff.abs().amax(dim=0) > tolerance).flatten()  # [k]
            if columns.numel():
                modules[module] = ModuleDelta(index=columns.to(torch.int64), delta=diff[:, columns].contiguous())
            continue
        biggest = float(diff.abs().max()) if diff.numel() else 0.0
        if not math.isfinite(biggest) or biggest > tolerance:
            changed.append(f"{key} (max abs difference {biggest:.3g})")
        elif biggest > max_unchanged:
            max_unchanged = biggest
    if changed:
        raise InvalidRequestError(
            f"{tuned.path}: weights other than o_proj/down_proj columns changed beyond the tolerance "
            f"{tolerance:g}: {_first(changed)}. An S²FT adapter cannot represent this fine-tune "
            "(raise --tolerance only if these are rounding differences, e.g. a dtype conversion)"
        )
    if not modules:
        raise InvalidRequestError(f"{tuned.path}: no o_proj/down_proj column differs from the base beyond the "
                                  f"tolerance {tolerance:g}; there is nothing to extract")
    return modules, max_unchanged


def _make_adapter(base: LoadedModel, tuned: Path, modules: dict[str, ModuleDelta], tolerance: float,
                  permuted_layers: list[int]) -> Adapter:
    source = {"tuned_checkpoint": str(tuned), "tolerance": tolerance, "permuted": bool(permuted_layers)}
    if permuted_layers:
        source["permuted_layers"] = permuted_layers
        source["permutation_file"] = PERMUTATION_FILE
    config = make_config(base.name, base.fingerprint, extracted_from=source)
    return Adapter(config=config, modules=modules)


def _write_permutations(path: Path, permutations: dict[int, LayerPermutation]) -> None:
    body = {
        "convention": "order[j] = i: position j of the tuned checkpoint held head/channel i of the base",
        "layers": {str(i): {k: v for k, v in asdict(p).items() if v is not None}
                   for i, p in sorted(permutations.items())},
    }
    path.write_text(json.dumps(body) + "\n")


def _first(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")

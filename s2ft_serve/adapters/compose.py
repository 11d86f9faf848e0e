"""Adapter composition: a weighted sum of several S²FT adapters, itself a format-v1 adapter.

For each module, the merged adapter's indices are the union of the sources' indices (sorted);
columns that several sources touch get the weighted sum of their deltas, columns only one
source touches get that source's delta times its weight. Because every adapter means
`W[:, index] += delta`, the merged adapter is exactly `W + sum_i w_i * delta_i`.

Accumulation is in float32 (float64 if a source holds float64); a module is stored in the widest
floating dtype among the sources where that dtype holds its sums exactly, else in the accumulation's.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from s2ft_serve.adapters.format import (
    DELTA_SUFFIX,
    INDEX_SUFFIX,
    Adapter,
    ModuleDelta,
    make_config,
    validate_tensors,
)
from s2ft_serve.errors import InvalidRequestError


def merge_adapters(
    sources: list[tuple[Adapter, float]],
    base_model: str,
    fingerprint: str | None,
    names: Sequence[str] | None = None,
) -> Adapter:
    """Return the adapter `sum_i weight_i * adapter_i` over the union of indices per module.

    `fingerprint` is the base model's fingerprint (None: take the sources' common one); a source
    recording a different fingerprint is refused. `names` (one per source) only label the
    provenance kept in the merged config under `merged_from`.
    """
    _check_sources(sources, names)
    fingerprint = _common_fingerprint(sources, fingerprint)
    module_names = sorted({name for adapter, _ in sources for name in adapter.modules})
    modules = {name: _merge_module(name, sources) for name in module_names}
    # the format's own validation is the last word on the result (shapes, distinct indices, finite values)
    modules = validate_tensors(_as_tensors(modules), source="merged adapter")
    config = make_config(
        base_model,
        fingerprint,
        merged_from=_provenance(sources, names),
    )
    config["target_modules"] = _target_modules(sources)
    return Adapter(config=config, modules=modules)


def _check_sources(sources: list[tuple[Adapter, float]], names: Sequence[str] | None) -> None:
    if not sources:
        raise InvalidRequestError("merge needs at least one source adapter", param="sources")
    if names is not None and len(names) != len(sources):
        raise InvalidRequestError("merge: give one name per source adapter", param="sources")
    for i, (adapter, weight) in enumerate(sources):
        label = names[i] if names is not None else f"source {i}"
        if not isinstance(adapter, Adapter):
            raise InvalidRequestError(f"merge: {label} is not an adapter", param="sources")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise InvalidRequestError(f"merge: the weight of {label} must be a finite number, got {weight!r}",
                                      param="sources")
        if not adapter.modules:
            raise InvalidRequestError(f"merge: {label} has no adapted modules", param="sources")


def _common_fingerprint(sources: list[tuple[Adapter, float]], fingerprint: str | None) -> str | None:
    """The base fingerprint every source agrees with; a disagreement is refused."""
    recorded = {adapter.fingerprint for adapter, _ in sources if adapter.fingerprint}
    if fingerprint:
        others = recorded - {fingerprint}
        if others:
            raise InvalidRequestError(
                f"merge: a source adapter was trained on other base weights (fingerprint {sorted(others)[0]}, "
                f"base is {fingerprint})",
                param="sources",
            )
        return fingerprint
    if len(recorded) > 1:
        raise InvalidRequestError(
            f"merge: the source adapters were trained on different base weights ({', '.join(sorted(recorded))})",
            param="sources",
        )
    return next(iter(recorded), None)


def _merge_module(name: str, sources: list[tuple[Adapter, float]]) -> ModuleDelta:
    """One module: scatter each source's weighted delta into the union of column indices."""
    parts = [(adapter.modules[name], float(weight)) for adapter, weight in sources if name in adapter.modules]
    out_features = {md.delta.shape[0] for md, _ in parts}
    if len(out_features) > 1:
        raise InvalidRequestError(
            f"merge: module '{name}' has deltas of different out_features {sorted(out_features)} "
            "across the sources (adapters of different base models?)",
            param="sources",
        )
    store_dtype = _widest_dtype([md.delta.dtype for md, _ in parts])
    acc_dtype = torch.float64 if store_dtype == torch.float64 else torch.float32
    union = torch.unique(torch.cat([md.index.to(torch.int64) for md, _ in parts]))  # [k] sorted
    delta = torch.zeros(out_features.pop(), union.numel(), dtype=acc_dtype)  # [out, k]
    for md, weight in parts:
        position = torch.searchsorted(union, md.index.to(torch.int64))  # [k_i] where each column lands
        delta.index_add_(1, position, md.delta.to(acc_dtype) * weight)
    # kept in the sources' dtype only where that holds the sums exactly (QA: bfloat16 sources' weighted sums
    # were rounded to bfloat16, 2e-3 to 7e-2 in logits from the summed deltas' model)
    stored = delta.to(store_dtype)
    return ModuleDelta(index=union, delta=stored if torch.equal(stored.to(acc_dtype), delta) else delta)


def _widest_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    # bfloat16 + float16 promotes to float32, which is what we want
    return result


def _as_tensors(modules: dict[str, ModuleDelta]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, md in modules.items():
        tensors[name + INDEX_SUFFIX] = md.index
        tensors[name + DELTA_SUFFIX] = md.delta
    return tensors


def _provenance(sources: list[tuple[Adapter, float]], names: Sequence[str] | None) -> list[dict]:
    entries = []
    for i, (adapter, weight) in enumerate(sources):
        if names is not None:
            label = names[i]
        elif adapter.path is not None:
            label = str(adapter.path)
        else:
            label = f"source-{i}"
        entries.append({"adapter": label, "weight": float(weight), "base_model": adapter.base_model})
    return entries


def _target_modules(sources: list[tuple[Adapter, float]]) -> list[str]:
    seen: list[str] = []
    for adapter, _ in sources:
        for target in adapter.config.get("target_modules") or []:
            if target not in seen:
                seen.append(target)
    return seen or ["o_proj", "down_proj"]

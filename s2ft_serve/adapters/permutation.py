"""Recovering and undoing a permutation of attention heads and FFN channels.

The S²FT authors' reference code trains by moving the selected heads / FFN channels to the
front of each layer (permuting q/k/v/gate/up rows and o/down columns consistently, which leaves
the function unchanged) and saves that permuted, merged model. The rows of `q_proj`, `k_proj`
and `gate_proj` are never trained, so each one is an exact copy of some base row: matching them
to the base recovers the permutation, and applying its inverse brings the checkpoint back into
the base model's order.

Convention: `order[j] = i` means that block `j` of the permuted tensor is block `i` of the base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_PROJECTION_SEED = 1234


@dataclass
class LayerPermutation:
    """How one layer of a checkpoint is permuted relative to the base (None: not permuted)."""

    heads: list[int] | None = None  # query heads: o_proj column blocks, q_proj row blocks
    kv_heads: list[int] | None = None  # k_proj / v_proj row blocks
    channels: list[int] | None = None  # FFN channels: gate/up rows, down_proj columns

    @property
    def is_identity(self) -> bool:
        return self.heads is None and self.kv_heads is None and self.channels is None


def match_rows(tuned: torch.Tensor, base: torch.Tensor, tolerance: float) -> list[int] | None:
    """`order` with `tuned[j] ≈ base[order[j]]` (max abs difference ≤ tolerance) for every row j.

    Returns `list(range(n))` when the rows are already in place and None when the rows of
    `tuned` are not a permutation of those of `base`. Rows are matched by sorting a random
    projection, and every match is verified; rows whose match fails verification (ties or
    tolerance-sized noise) fall back to an exhaustive nearest-row search.
    """
    tuned = tuned.reshape(tuned.shape[0], -1).to(torch.float32)  # [n, m]
    base = base.reshape(base.shape[0], -1).to(torch.float32)  # [n, m]
    if tuned.shape != base.shape:
        return None
    if _max_abs(tuned - base) <= tolerance:
        return list(range(tuned.shape[0]))
    g = torch.Generator().manual_seed(_PROJECTION_SEED)
    direction = torch.randn(tuned.shape[1], generator=g, dtype=torch.float64)  # [m]
    order = torch.empty(tuned.shape[0], dtype=torch.int64)  # [n]
    order[torch.argsort(tuned.double() @ direction)] = torch.argsort(base.double() @ direction)
    row_error = (tuned - base[order]).abs().amax(dim=1)  # [n]
    for j in torch.nonzero(row_error > tolerance).flatten().tolist():
        distance = (base - tuned[j]).abs().amax(dim=1)  # [n]
        best = int(torch.argmin(distance))
        if float(distance[best]) > tolerance:
            return None
        order[j] = best
    if torch.unique(order).numel() != order.numel():
        return None
    return order.tolist()


def match_blocks(tuned: torch.Tensor, base: torch.Tensor, block: int, tolerance: float) -> list[int] | None:
    """Like `match_rows`, for groups of `block` consecutive rows (one attention head each)."""
    if tuned.shape != base.shape or tuned.shape[0] % block:
        return None
    n = tuned.shape[0] // block
    return match_rows(tuned.reshape(n, -1), base.reshape(n, -1), tolerance)


def unpermute(tensor: torch.Tensor, order: list[int] | None, dim: int, block: int = 1) -> torch.Tensor:
    """Bring `tensor` back to base order along `dim`, moving blocks of `block` entries."""
    if order is None:
        return tensor
    inverse = torch.argsort(torch.tensor(order, dtype=torch.int64))  # base block i sits at inverse[i]
    n = len(order)
    shape = list(tensor.shape)
    grouped = tensor.reshape(shape[:dim] + [n, block] + shape[dim + 1:])
    return grouped.index_select(dim, inverse).reshape(shape)


def is_identity(order: list[int] | None) -> bool:
    return order is None or order == list(range(len(order)))


def consistent_gqa(heads: list[int], kv_heads: list[int], group: int) -> bool:
    """Each permuted query head must still read the key/value head its base head read."""
    return all(kv_heads[j // group] == heads[j] // group for j in range(len(heads)))


def describe(order: list[int]) -> dict:
    """A compact account of one permutation: how many entries moved and the first few of them."""
    moved = [(j, i) for j, i in enumerate(order) if i != j]
    return {"size": len(order), "moved": len(moved), "first_moved": [list(p) for p in moved[:8]]}


def _max_abs(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0

"""The S²FT adapter kernels: add `delta_a @ x[index_a]` per token, for a batch of mixed adapters.

Adapter columns live in a per-module *table* whose rows are `delta.T` rows: slot `s` owns rows
`rows[s, :k_s]`; padding rows point at an all-zero row. For a token whose adapter sits in slot
`s`, the correction is `sum_j x[cols[s, j]] * table[rows[s, j]]`, which is exactly what
`F.embedding_bag(mode="sum", per_sample_weights=...)` computes, in one fused call for the whole
batch, reading only the rows it needs: no per-token weight is materialised, no weights are
merged. A token may carry several slots (an adapter plus a fused adapter's correction); their
bags are concatenated. A batched prefill of prompts with different adapters gathers each prompt's
rows once and does one batched matmul (`row_delta`).

Every fast path has a plain reference (`*_reference`) with the same signature, compared in tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mixed_delta(
    x: torch.Tensor,  # [T, in]
    table: torch.Tensor,  # [R, out], rows of delta.T; some row is all zeros (padding)
    rows: torch.Tensor,  # [T, m*k_cap] int64, table rows per token
    cols: torch.Tensor,  # [T, m*k_cap] int64, input features per token
) -> torch.Tensor:  # [T, out]
    """Mixed-adapter correction for every token in one embedding_bag call."""
    weights = x.gather(1, cols)  # [T, m*k_cap]
    if table.dtype != x.dtype:  # a bfloat16 table of a float32 module: widen the rows used, exactly
        return torch.bmm(weights[:, None], table[rows].to(x.dtype))[:, 0]
    return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")


def mixed_delta_reference(x, table, rows, cols):
    """Plain loop over tokens: gather the token's features, multiply by its rows."""
    out = torch.zeros(x.shape[0], table.shape[1], dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        out[t] = x[t, cols[t]].float() @ table[rows[t]].float()
    return out.to(x.dtype)


def row_delta(
    x: torch.Tensor,  # [P, L, in], P prompts (a batched prefill), each of one slot tuple
    table: torch.Tensor,  # [R, out]
    rows: torch.Tensor,  # [P, m*k_cap] int64, table rows per prompt
    cols: torch.Tensor,  # [P, m*k_cap] int64, input features per prompt
) -> torch.Tensor:  # [P, L, out]
    """Per-prompt correction: gather each prompt's rows and features once, one batched matmul."""
    features = x.gather(2, cols[:, None, :].expand(-1, x.shape[1], -1))  # [P, L, m*k_cap]
    return torch.bmm(features, table[rows].to(x.dtype))  # table[rows]: [P, m*k_cap, out]


def row_delta_reference(x, table, rows, cols):
    """Plain loop over prompts: each prompt's tokens times its own gathered rows."""
    return torch.stack([x[p][:, cols[p]].float() @ table[rows[p]].float() for p in range(x.shape[0])]).to(x.dtype)


def segment_delta(
    x: torch.Tensor,  # [T, in], every token of the same adapter
    delta_t: torch.Tensor,  # [k, out], a contiguous block of the table
    index: torch.Tensor,  # [k] int64
) -> torch.Tensor:  # [T, out]
    """One adapter for a whole segment (a prefill): gather k features, one matmul."""
    return x.index_select(1, index) @ delta_t


def segment_delta_reference(x, delta_t, index):
    merged = torch.zeros(x.shape[1], delta_t.shape[1], dtype=torch.float32, device=x.device)
    merged[index] = delta_t.float()
    return (x.float() @ merged).to(x.dtype)

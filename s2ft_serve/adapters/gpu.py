"""The mixed-adapter S²FT correction on a GPU, as one Triton kernel per adapted module and step.

The same operation, arguments and layout as the compiled CPU kernel (csrc/slot_delta.cpp): for every
token t and each slot s it carries,

    y[t] += sum_j x[t, cols[s, j]] * table[(s - 1) * k_cap + j]      (j < ks[s]; slot 0 is no slot)

summed in float32 and added to y rounded once. A small model's decode step on a GPU is bound by the
host launching kernels, not by the GPU: torch's `embedding_bag` path costs five or six launches per
module and step (index the slot tables twice, gather x, the bag, the add), this one a single launch
that reads the slot tables, x and the table rows in place and adds into the base output. Triton comes
with PyTorch's CUDA builds; where it is missing, `slot_delta_op()` is None and the engine uses
`embedding_bag`.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

log = logging.getLogger(__name__)

BLOCK_N = 128  # output features per program
BLOCK_K = 32  # table rows per inner step


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def slot_delta_kernel(y_ptr, x_ptr, table_ptr, slots_ptr, ks_ptr, cols_ptr,
                          out_features, m, k_cap, stride_y, stride_x, stride_t, stride_s, stride_c,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < out_features
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(0, m):
            slot = tl.load(slots_ptr + t * stride_s + i)
            k = tl.load(ks_ptr + slot)
            start = (slot - 1) * k_cap
            for j0 in range(0, k, BLOCK_K):
                j = j0 + tl.arange(0, BLOCK_K)
                j_ok = j < k
                cols = tl.load(cols_ptr + slot * stride_c + j, mask=j_ok, other=0)
                xv = tl.load(x_ptr + t * stride_x + cols, mask=j_ok, other=0.0).to(tl.float32)
                rows = tl.load(table_ptr + (start + j)[:, None] * stride_t + n[None, :],
                               mask=j_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(xv[:, None] * rows, axis=0)
        out = y_ptr + t * stride_y + n
        y = tl.load(out, mask=n_ok, other=0.0)
        tl.store(out, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=n_ok)

    return slot_delta_kernel


def slot_delta_add(y: torch.Tensor, x: torch.Tensor, table: torch.Tensor, token_slots: torch.Tensor,
                   ks: torch.Tensor, cols: torch.Tensor) -> None:
    """y [T, out] += each token's slots' corrections, in place (the CPU kernel's signature).
    x [T, in], table [R, out], token_slots [T, m], ks [S], cols [S, k_cap]: rows contiguous, one device."""
    tokens, out_features = y.shape
    if tokens == 0:
        return
    if not (x.shape[0] == token_slots.shape[0] == tokens and table.shape[1] == out_features
            and y.stride(1) == x.stride(1) == table.stride(1) == token_slots.stride(1) == cols.stride(1) == 1):
        raise ValueError("slot_delta_add: y [T, out], x [T, in], table [R, out], token_slots [T, m] and cols "
                         "[S, k_cap] must agree and have contiguous rows")
    import triton

    grid = (tokens, triton.cdiv(out_features, BLOCK_N))
    _kernel()[grid](y, x, table, token_slots, ks, cols, out_features, token_slots.shape[1], cols.shape[1],
                    y.stride(0), x.stride(0), table.stride(0), token_slots.stride(0), cols.stride(0),
                    BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


@functools.cache
def slot_delta_op():
    """`slot_delta_add` where Triton is importable, else None (logged once)."""
    try:
        importlib.import_module("triton.language")
    except ImportError as e:
        log.warning("no Triton (%s): mixed-adapter GPU steps use embedding_bag", e)
        return None
    return slot_delta_add

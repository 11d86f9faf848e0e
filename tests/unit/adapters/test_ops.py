"""The S²FT kernels equal their plain references."""

from __future__ import annotations

import pytest
import torch

from s2ft_serve.adapters.layers import NATIVE_MAX_ROW_LEN, AdapterBatch, S2FTLinear
from s2ft_serve.adapters.ops import (mixed_delta, mixed_delta_reference, row_delta, row_delta_reference, segment_delta,
                                     segment_delta_reference)


def test_mixed_delta_matches_reference():
    g = torch.Generator().manual_seed(0)
    T, IN, OUT, R, K = 9, 40, 24, 31, 6
    x = torch.randn(T, IN, generator=g)
    table = torch.randn(R, OUT, generator=g)
    table[-1] = 0
    rows = torch.randint(0, R, (T, K), generator=g)
    cols = torch.randint(0, IN, (T, K), generator=g)
    assert torch.allclose(mixed_delta(x, table, rows, cols), mixed_delta_reference(x, table, rows, cols), atol=1e-5)


def test_row_delta_matches_reference():
    g = torch.Generator().manual_seed(3)
    P, L, IN, OUT, R, K = 5, 7, 40, 24, 31, 6
    x = torch.randn(P, L, IN, generator=g)
    table = torch.randn(R, OUT, generator=g)
    table[-1] = 0
    rows = torch.randint(0, R, (P, K), generator=g)
    cols = torch.randint(0, IN, (P, K), generator=g)
    assert torch.allclose(row_delta(x, table, rows, cols), row_delta_reference(x, table, rows, cols), atol=1e-5)


def test_segment_delta_matches_reference():
    g = torch.Generator().manual_seed(1)
    x, delta_t = torch.randn(7, 32, generator=g), torch.randn(5, 16, generator=g)
    index = torch.randperm(32, generator=g)[:5]
    assert torch.allclose(segment_delta(x, delta_t, index), segment_delta_reference(x, delta_t, index), atol=1e-5)


def test_layer_slots_grow_and_reset_exactly():
    g = torch.Generator().manual_seed(2)
    base = torch.nn.Linear(32, 16, bias=False)
    batch = AdapterBatch()
    layer = S2FTLinear(base, batch)
    adapters = {}
    for slot, k in [(1, 3), (2, 7), (5, 2)]:  # k grows after slot 1 is written: the table re-lays out
        index, delta = torch.randperm(32, generator=g)[:k], torch.randn(16, k, generator=g)
        layer.reserve(8, 1)
        layer.set_slot(slot, index, delta)
        adapters[slot] = (index, delta)
    x = torch.randn(4, 32, generator=g)
    batch.set_mixed(torch.tensor([[1], [2], [0], [5]]))
    y = layer(x)
    for row, slot in enumerate([1, 2, None, 5]):
        w = base.weight.detach().clone()
        if slot:
            index, delta = adapters[slot]
            w[:, index] += delta
        assert torch.allclose(y[row], x[row] @ w.t(), atol=1e-5)
    layer.reset_slot(2)
    batch.set_single((2,))
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("kernel, length", [("native", 4), ("native", NATIVE_MAX_ROW_LEN + 1), ("torch", 4)])
@torch.inference_mode()  # as the engine runs it (with autograd recording, the kernel never serves)
def test_layer_rows_mode_applies_each_prompts_own_slots(kernel, length):
    """A batched prefill: prompt p's tokens get exactly its slots' columns (several slots add up), through
    the compiled kernel for short rows, `row_delta` for longer ones or without the kernel."""
    g = torch.Generator().manual_seed(4)
    base = torch.nn.Linear(32, 16, bias=False)
    batch = AdapterBatch()
    layer = S2FTLinear(base, batch, kernel=kernel)
    calls = []
    if layer.native is not None:  # a spy: which path served the pass
        op = layer.native
        layer.native = lambda *args: (calls.append(1), op(*args))
    layer.reserve(6, 1)
    adapters = {}
    for slot, k in [(1, 3), (2, 7), (5, 2)]:
        index, delta = torch.randperm(32, generator=g)[:k], torch.randn(16, k, generator=g)
        layer.set_slot(slot, index, delta)
        adapters[slot] = (index, delta)
    x = torch.randn(3, length, 32, generator=g)  # 3 prompts of `length` tokens
    per_prompt = [(1, 0), (2, 5), (0, 0)]
    batch.set_rows(torch.tensor(per_prompt))
    y = layer(x)
    for p, slots in enumerate(per_prompt):
        w = base.weight.detach().clone()
        for slot in slots:
            if slot:
                index, delta = adapters[slot]
                w[:, index] += delta
        assert torch.allclose(y[p], x[p] @ w.t(), atol=1e-5), p
    assert len(calls) == (kernel == "native" and length <= NATIVE_MAX_ROW_LEN)


def test_batch_gives_every_token_its_slots_once_per_pass():
    batch = AdapterBatch()
    batch.set_rows(torch.tensor([[1, 0], [2, 5]]))
    per_token = batch.per_token(3)
    assert per_token.tolist() == [[1, 0]] * 3 + [[2, 5]] * 3
    assert batch.per_token(3) is per_token  # the modules of one pass share it
    batch.set_rows(torch.tensor([[4, 0], [2, 5]]))  # the next pass: its own slots
    assert batch.per_token(3).tolist() == [[4, 0]] * 3 + [[2, 5]] * 3
    mixed = torch.tensor([[1], [3]])
    batch.set_mixed(mixed)
    assert batch.per_token(1) is mixed

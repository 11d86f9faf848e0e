"""The mixed-step kernel's GPU twin (Triton): equal to the reference; chosen on CUDA, optional."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from s2ft_serve.adapters import gpu, native
from s2ft_serve.adapters.ops import mixed_delta_reference

from test_native_kernel import slot_layout


def cuda_weight(dtype=torch.float32):
    """What `resolve` reads of a CUDA weight (its device and dtype), without a GPU."""
    return SimpleNamespace(device=torch.device("cuda"), dtype=dtype)


def test_resolve_picks_the_gpu_kernel_on_cuda_for_every_dtype(monkeypatch):
    op = object()
    monkeypatch.setattr(gpu, "slot_delta_op", lambda: op)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert native.resolve("auto", cuda_weight(dtype)) is op
        assert native.resolve("native", cuda_weight(dtype)) is op
        assert native.resolve("torch", cuda_weight(dtype)) is None


def test_without_triton_cuda_falls_back_to_embedding_bag_or_refuses_native(monkeypatch):
    monkeypatch.setattr(gpu, "slot_delta_op", lambda: None)
    assert native.resolve("auto", cuda_weight()) is None
    with pytest.raises(RuntimeError, match="needs Triton"):
        native.resolve("native", cuda_weight())


needs_triton = pytest.mark.skipif(not torch.cuda.is_available() or gpu.slot_delta_op() is None,
                                  reason="needs CUDA and Triton")


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("dtype,table_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("seed,T,m,inp,out,k_cap", [(0, 9, 1, 40, 24, 6), (1, 32, 2, 70, 37, 19),
                                                    (2, 5, 3, 64, 576, 64), (3, 1, 1, 16, 9, 1), (4, 300, 1, 96, 200, 40)])
def test_gpu_kernel_adds_the_reference_correction(seed, T, m, inp, out, k_cap, dtype, table_dtype):
    """Slots of random k from 0 to k_cap, several per token, the null slot, NaN padding rows it must not
    read; the correction is summed in float32 and added to what y holds, rounded once."""
    g = torch.Generator().manual_seed(seed)
    table, ks, cols, rows = slot_layout(g, 7, k_cap, inp, out)
    table = table.to(table_dtype)
    x = torch.randn(T, inp, generator=g).to(dtype)
    token_slots = torch.randint(0, 7, (T, m), generator=g)
    y0 = torch.randn(T, out, generator=g).to(dtype)
    tr, tc = rows[token_slots].view(T, -1), cols[token_slots].view(T, -1)
    expected = (y0.float() + mixed_delta_reference(x.float(), table.float(), tr, tc)).to(dtype)
    y = y0.cuda()
    gpu.slot_delta_add(y, x.cuda(), table.cuda(), token_slots.cuda(), ks.cuda(), cols.cuda())
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * expected.float().abs().max().item()
    assert (y.cpu().float() - expected.float()).abs().max().item() <= tol


@pytest.mark.cuda
@needs_triton
def test_gpu_kernel_takes_an_empty_batch():
    y = torch.zeros(0, 8, device="cuda")
    gpu.slot_delta_add(y, torch.zeros(0, 8, device="cuda"), torch.zeros(1, 8, device="cuda"),
                       torch.zeros(0, 1, dtype=torch.int64, device="cuda"), torch.zeros(1, dtype=torch.int64, device="cuda"),
                       torch.zeros(1, 1, dtype=torch.int64, device="cuda"))

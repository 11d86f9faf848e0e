"""Dense projections: fused and prepacked GEMMs give what the separate Linears give."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2ft_serve.model import gemm
from s2ft_serve.model.gemm import DenseGemm, Released, linear, release


def _linears(dtype, biases):
    torch.manual_seed(0)
    outs = [24, 8, 8]
    layers = [nn.Linear(16, o, bias=b).to(dtype) for o, b in zip(outs, biases)]
    return layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("biases", [(False, False, False), (True, True, True), (True, False, True)])
def test_fused_gemm_equals_separate_linears(dtype, biases):
    layers = _linears(dtype, biases)
    x = torch.randn(3, 5, 16, dtype=dtype)
    want = [F.linear(x, lin.weight, lin.bias) for lin in layers]
    fused = DenseGemm(layers, batch_hint=4, onednn=True)
    assert fused.packed == (dtype == torch.float32 and torch.backends.mkldnn.is_available())
    got = fused(x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


def test_without_onednn_the_models_own_linears_run_untouched(monkeypatch):
    monkeypatch.setattr(gemm, "onednn_usable", lambda weight: False)
    layers = _linears(torch.float32, (True, True, True))
    weights = [lin.weight for lin in layers]
    x = torch.randn(2, 16)
    want = [lin(x) for lin in layers]
    fused = DenseGemm(layers, batch_hint=4, onednn=True)
    assert not fused.packed
    assert all(lin.weight is w for lin, w in zip(layers, weights))  # nothing copied, nothing released
    for got, w in zip(fused(x), want):
        assert torch.equal(got, w)


def test_exact_gemm_calls_the_models_own_linears_bit_for_bit():
    layers = _linears(torch.float32, (True, False, True))
    x = torch.randn(3, 16)
    outs = DenseGemm(layers, batch_hint=4, onednn=False)(x)
    for lin, got in zip(layers, outs):
        assert torch.equal(got, F.linear(x, lin.weight, lin.bias))


def test_linear_reads_a_column_major_weight_and_sees_in_place_edits():
    w = torch.randn(12, 20).t().contiguous().t()  # column-major, as the adapted modules store it
    b = torch.randn(12)
    x = torch.randn(4, 3, 20)
    torch.testing.assert_close(linear(x, w, b, onednn=True), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    w[:, 3] += 1.0  # fusion edits columns in place; the next call must see it
    torch.testing.assert_close(linear(x, w, b, onednn=True), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert torch.equal(linear(x, w, b, onednn=False), F.linear(x, w, b))


def test_released_projection_says_why_it_cannot_run():
    parent = nn.Module()
    parent.q = nn.Linear(4, 6)
    release(parent, ["q"])
    assert isinstance(parent.q, Released) and (parent.q.in_features, parent.q.out_features) == (4, 6)
    with pytest.raises(RuntimeError, match="packed GEMM"):
        parent.q(torch.zeros(1, 4))


def test_a_model_packed_for_one_engine_is_refused_by_a_second(tiny_llama_dir):
    from s2ft_serve.model.forward import Transformer
    from s2ft_serve.model.loading import load_model

    model = load_model(str(tiny_llama_dir), dtype="float32", device="cpu").model
    Transformer(model, max_rows=2, max_len=16, gemm="onednn")
    if not isinstance(model.model.layers[0].self_attn.q_proj, Released):
        pytest.skip("no oneDNN here: nothing is packed, so nothing is released")
    with pytest.raises(ValueError, match="already serves another engine"):
        Transformer(model, max_rows=2, max_len=16, gemm="onednn")

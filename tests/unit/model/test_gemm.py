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


@torch.inference_mode()
def test_wide_linear_gives_the_linears_bits_for_every_row_count():
    torch.manual_seed(0)
    head = nn.Linear(64, 5000, bias=False)  # several CHUNKs, the last one partial
    wide = gemm.WideLinear(head)
    for rows in [*range(1, 40), 64, 128, 129]:
        x = torch.randn(rows, 64)
        assert torch.equal(wide(x), F.linear(x, head.weight)), rows
    x = torch.randn(2, 3, 64)  # any leading shape
    assert torch.equal(wide(x), F.linear(x, head.weight))
    assert set(wide.verified) == set(range(2, 40)) | {64, 128}  # one probe per row count; 1 and > 128 never tried
    assert any(wide.verified.values())  # the faster form is in use somewhere, so it was tested above


@torch.inference_mode()
def test_wide_linear_keeps_the_linear_for_a_row_count_that_rounds_otherwise(monkeypatch):
    torch.manual_seed(0)
    head = nn.Linear(16, 300, bias=False)
    wide = gemm.WideLinear(head)
    transposed, calls = wide._transposed, []

    def other_bits(x, w):
        calls.append(x.shape[0])
        return transposed(x, w) * (1 + 1e-6)

    monkeypatch.setattr(wide, "_transposed", other_bits)
    x = torch.randn(8, 16)
    assert torch.equal(wide(x), F.linear(x, head.weight))
    assert wide.verified == {8: False} and calls == [8]  # the probe only
    assert torch.equal(wide(x), F.linear(x, head.weight)) and calls == [8]  # not tried again


@pytest.mark.parametrize("make", [lambda: nn.Linear(16, 300, bias=True),
                                  lambda: nn.Linear(16, 300, bias=False).to(torch.bfloat16)])
@torch.inference_mode()
def test_wide_linear_calls_the_linear_for_a_bias_or_another_dtype(make):
    head = make()
    wide = gemm.WideLinear(head)
    x = torch.randn(8, 16, dtype=head.weight.dtype)
    assert torch.equal(wide(x), head(x)) and wide.verified == {}


def test_exact_lm_head_is_the_wide_linear_and_onednn_packs_it(tiny_llama_dir):
    from s2ft_serve.model.forward import Transformer
    from s2ft_serve.model.loading import load_model

    exact = Transformer(load_model(str(tiny_llama_dir), dtype="float32", device="cpu").model, 4, 32, gemm="exact")
    assert isinstance(exact.lm_head, gemm.WideLinear) and exact.lm_head.linears[0] is exact.hf.lm_head
    packed = Transformer(load_model(str(tiny_llama_dir), dtype="float32", device="cpu").model, 4, 32, gemm="onednn")
    assert isinstance(packed.lm_head, DenseGemm)
    assert packed.lm_head.packed == gemm.onednn_usable(packed.hf.model.embed_tokens.weight)

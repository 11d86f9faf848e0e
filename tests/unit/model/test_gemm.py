"""Dense projections: fused and prepacked GEMMs give what the separate Linears give."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2ft_serve.adapters import native
from s2ft_serve.model import gemm
from s2ft_serve.model.gemm import DenseGemm, Released, onednn_linear, release


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
    # bfloat16 where the CPU has native bfloat16 arithmetic (AVX-512 BF16, AMX)
    native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert fused.packed == (torch.backends.mkldnn.is_available() and (dtype == torch.float32 or native_bf16))
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
    # nothing released, nothing changed (the weights may now be views of one tensor, see FusedExact)
    assert all(torch.equal(lin.weight, w) for lin, w in zip(layers, weights))
    for got, w in zip(fused(x), want):
        assert torch.equal(got, w)


def test_exact_gemm_calls_the_models_own_linears_bit_for_bit():
    layers = _linears(torch.float32, (True, False, True))
    x = torch.randn(3, 16)
    outs = DenseGemm(layers, batch_hint=4, onednn=False)(x)
    for lin, got in zip(layers, outs):
        assert torch.equal(got, F.linear(x, lin.weight, lin.bias))


@torch.inference_mode()
def test_onednn_and_exact_read_a_column_major_weight_and_see_in_place_edits():
    lin = nn.Linear(20, 16)
    lin.weight = nn.Parameter(lin.weight.detach().t().contiguous().t(), requires_grad=False)  # as adapted modules
    w, b = lin.weight, lin.bias
    exact = gemm.ExactLinear(lin)
    x = torch.randn(4, 3, 20)
    torch.testing.assert_close(onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    exact(x)
    w[:, 3] += 1.0  # fusion edits columns in place; the next call must see it
    torch.testing.assert_close(onednn_linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert torch.equal(exact(x), F.linear(x, w, b))


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


def _column_major(lin: nn.Linear) -> nn.Linear:
    lin.weight = nn.Parameter(lin.weight.detach().t().contiguous().t(), requires_grad=False)
    return lin


@pytest.mark.parametrize("make, wide", [
    (lambda: nn.Linear(64, 5000, bias=False), True),  # an LM head: several CHUNKs, the last one partial
    (lambda: nn.Linear(64, 96, bias=False), False),  # q/k/v, gate/up: row-major
    (lambda: nn.Linear(64, 100, bias=True), False),  # a bias (Qwen2's q/k/v); rows not a multiple of 8
    (lambda: _column_major(nn.Linear(200, 64, bias=False)), False),  # o_proj/down_proj, K in two blocks
    (lambda: _column_major(nn.Linear(400, 72, bias=True)), False),  # K in blocks of 192 and a partial one
])
@torch.inference_mode()
def test_exact_linear_gives_the_linears_bits_for_every_row_count(make, wide):
    """Where a probe showed F.linear's bits (MKL's blocked order: 4, 8, 12+ rows on x86 MKL) the output
    equals F.linear's; at the few-row counts MKL computes otherwise, the compiled kernel keeps the
    blocked order: each row equals that row of a larger pass (batch-invariant), close to F.linear."""
    torch.manual_seed(0)
    lin = make()
    exact = gemm.ExactLinear(lin, wide=wide)
    big = torch.randn(40, lin.in_features)
    whole = exact(big)
    for rows in [*range(1, 40), 64, 128, 129]:
        x = big[:rows] if rows <= 40 else torch.randn(rows, lin.in_features)
        got, want = exact(x), F.linear(x, lin.weight, lin.bias)
        if exact.chosen.get(rows) == "kernel" and not exact.same_bits[rows]:
            assert rows < exact.FEW_ROWS, rows  # AVX2 MKL's few-row counts: the kernel's blocked order
            assert torch.equal(got, whole[:rows]), rows  # the bits of the same rows in a 40-row pass
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        else:  # a form that gives the Linear's bits (the faster of it and the Linear), or the Linear
            assert torch.equal(got, want), rows
    x = torch.randn(2, 3, lin.in_features)  # any leading shape
    assert torch.equal(exact(x), exact(x.reshape(6, -1)).view(2, 3, -1))
    assert set(exact.chosen) == set(range(1, 41)) | {64, 128}  # one probe per row count; > 128 never tried
    if native.exact_linear_op() is not None:  # the kernel gave the Linear's bits at some counts (x86 MKL)
        assert any(exact.same_bits[r] and exact.caps[r] for r in exact.chosen)


@torch.inference_mode()
def test_exact_linear_keeps_the_linear_for_a_row_count_that_rounds_otherwise(monkeypatch):
    torch.manual_seed(0)
    head = nn.Linear(16, 300, bias=False)
    exact = gemm.ExactLinear(head, wide=True)
    calls = []

    def other_bits(form):
        def run(x):
            calls.append(x.shape[0])
            return form(x) * (1 + 1e-6)
        return run

    exact.forms = {name: other_bits(form) for name, form in exact.forms.items()}
    x = torch.randn(16, 16)
    assert torch.equal(exact(x), F.linear(x, head.weight))
    # each form's probe only: the kernel at both blocks of MKL's order, the transposed product
    assert exact.chosen == {16: None} and calls == [16, 16, 16]
    assert torch.equal(exact(x), F.linear(x, head.weight)) and calls == [16, 16, 16]  # not tried again
    x = torch.randn(6, 16)  # a few-row count: the kernel would serve only if it gave F.linear's bits at 4 rows
    assert torch.equal(exact(x), F.linear(x, head.weight))
    assert exact.chosen == {16: None, 6: None, 4: None} and calls == [16] * 3 + [6, 6, 4, 4, 4, 6]


@torch.inference_mode()
def test_exact_linear_without_the_compiled_kernel_uses_the_other_forms(monkeypatch):
    monkeypatch.setattr(native, "exact_linear_op", lambda: None)  # as where no compiler is installed
    torch.manual_seed(0)
    head, proj = nn.Linear(16, 300, bias=False), nn.Linear(16, 24, bias=False)
    wide, narrow = gemm.ExactLinear(head, wide=True), gemm.ExactLinear(proj)
    for rows in (2, 4, 16, 32):
        x = torch.randn(rows, 16)
        assert torch.equal(wide(x), head(x)) and torch.equal(narrow(x), proj(x))
    assert "kernel" not in wide.chosen.values() and set(narrow.chosen.values()) == {None}


@torch.inference_mode()
def test_the_kernel_refuses_what_it_cannot_compute():
    op = native.exact_linear_op()
    if op is None:
        pytest.skip("no compiled kernel here")
    with pytest.raises(RuntimeError, match="multiple of 8"):
        op(torch.randn(4, 16), torch.randn(16, 12).t(), None)  # column-major, 12 output rows
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16), None)
    with pytest.raises(RuntimeError, match="bias"):
        op(torch.randn(4, 16), torch.randn(8, 16), torch.randn(7))
    empty, b = torch.randn(16, 0), torch.randn(16)  # no input features: an empty sum, as F.linear gives
    assert torch.equal(op(torch.randn(3, 0), empty, b), F.linear(torch.randn(3, 0), empty, b))
    assert torch.equal(op(torch.randn(3, 0), empty, None), torch.zeros(3, 16))


@pytest.mark.parametrize("make", [lambda: nn.Linear(16, 300, bias=True).to(torch.bfloat16),
                                  lambda: nn.Linear(16, 300, bias=False).to(torch.bfloat16)])
@torch.inference_mode()
def test_exact_linear_calls_the_linear_for_another_dtype(make):
    head = make()
    exact = gemm.ExactLinear(head, wide=True)
    x = torch.randn(8, 16, dtype=head.weight.dtype)
    assert torch.equal(exact(x), head(x)) and exact.chosen == {}


def test_exact_projections_are_exact_linears_and_onednn_packs_them(tiny_llama_dir):
    from s2ft_serve.model.forward import Transformer
    from s2ft_serve.model.loading import load_model

    exact = Transformer(load_model(str(tiny_llama_dir), dtype="float32", device="cpu").model, 4, 32, gemm="exact")
    assert isinstance(exact.lm_head, gemm.ExactLinear) and exact.lm_head.linears[0] is exact.hf.lm_head
    attn = exact.hf.model.layers[0].self_attn
    assert [e.linears[0] for e in exact.qkv[0].exact] == [attn.q_proj, attn.k_proj, attn.v_proj]
    packed = Transformer(load_model(str(tiny_llama_dir), dtype="float32", device="cpu").model, 4, 32, gemm="onednn")
    assert isinstance(packed.lm_head, DenseGemm)
    assert packed.lm_head.packed == gemm.onednn_usable(packed.hf.model.embed_tokens.weight)


@torch.inference_mode()
def test_projections_of_one_model_share_their_probes(tiny_llama_dir):
    """Which form gives F.linear's bits depends on shapes, layout and alignment, not on values: two
    projections of one shape probe once per row count, another shape probes on its own; one engine
    shares one table across the dense projections, the adapted modules and the LM head."""
    torch.manual_seed(0)
    shared = {}
    first, second = nn.Linear(64, 96, bias=False), nn.Linear(64, 96, bias=False)
    other = nn.Linear(64, 40, bias=False)
    a, b, c = (gemm.ExactLinear(lin, verdicts=shared) for lin in (first, second, other))
    probes = []
    for e in (b, c):
        probe = e._probe
        e._probe = lambda rows, probe=probe: probes.append(rows) or probe(rows)
    x = torch.randn(8, 64)
    a(x)
    b(x)
    assert probes == [] and b.chosen[8] == a.chosen[8] and b.same_bits[8] == a.same_bits[8]
    if b.same_bits[8]:
        assert torch.equal(b(x), F.linear(x, second.weight))
    c(x)
    assert probes == [8]

    from s2ft_serve.engine.runner import ModelRunner
    from s2ft_serve.model.loading import load_model

    runner = ModelRunner(load_model(str(tiny_llama_dir), dtype="float32", device="cpu").model, 2, 32)
    tables = {id(e.verdicts) for dense in (*runner.model.qkv, *runner.model.gate_up) for e in dense.exact}
    tables |= {id(layer.exact.verdicts) for layer in runner.layers.values()} | {id(runner.model.lm_head.verdicts)}
    assert len(tables) == 1


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(64, 96, bias=True),  # row-major, one block of K
    lambda: nn.Linear(400, 72, bias=False),  # row-major, K in two blocks (AVX-512) or 192s + rest (AVX2)
    lambda: _column_major(nn.Linear(400, 72, bias=True)),  # o_proj/down_proj where kept column-major
])
@torch.inference_mode()
def test_merged_gives_the_merged_weights_bits_without_building_it(make):
    """ExactLinear.merged(x, cols, rows): the base GEMM with columns `cols` read as `w + rows.T` (rounded
    to float32 as `W[:, index] += delta` stores them): F.linear's bits on the merged weight wherever the
    kernel gives the Linear's bits, and the base weight untouched."""
    if native.exact_linear_op() is None:
        pytest.skip("no compiled kernel here")
    torch.manual_seed(0)
    lin = make()
    exact = gemm.ExactLinear(lin)
    cols = torch.randperm(lin.in_features)[:23]
    delta = torch.randn(lin.out_features, 23) * 0.05
    merged = lin.weight.detach().clone()
    merged[:, cols] += delta
    before = lin.weight.detach().clone()
    checked = 0
    for rows in (4, 8, 16, 32, 64):
        x = torch.randn(rows, lin.in_features)
        got = exact.merged(x, cols, delta.t().contiguous())
        if not exact.caps[rows]:  # MKL sums otherwise at this row count: the caller corrects
            assert got is None
            continue
        if exact.same_bits[rows]:
            assert torch.equal(got, F.linear(x, merged, lin.bias)), rows
            checked += 1
        else:
            torch.testing.assert_close(got, F.linear(x, merged, lin.bias), atol=1e-5, rtol=1e-5)
    assert checked and torch.equal(lin.weight, before)
    assert exact.merged(torch.randn(200, lin.in_features), cols, delta.t().contiguous()) is None  # > MAX_ROWS
    op = native.exact_linear_op()
    x, w = torch.randn(4, lin.in_features), lin.weight
    with pytest.raises(RuntimeError, match="out of range or repeated"):
        op(x, w, None, 192, torch.tensor([0, 0]), torch.zeros(2, lin.out_features))
    with pytest.raises(RuntimeError, match="out of range or repeated"):
        op(x, w, None, 192, torch.tensor([lin.in_features]), torch.zeros(1, lin.out_features))
    with pytest.raises(RuntimeError, match=r"patch_rows float32 or bfloat16 \[k, N\]"):
        op(x, w, None, 192, torch.tensor([1]), torch.zeros(1, lin.out_features + 1))


@torch.inference_mode()
def test_an_adapted_module_keeps_the_row_major_linears_bits_whatever_its_layout():
    """S2FTLinear stores its weight column-major (fast fusion) only where the CPU's F.linear gives that
    layout the row-major weight's bits (MKL with AVX2; not with AVX-512): either way its base pass
    equals transformers' row-major Linear bit for bit from 4 rows on, prefill sizes included."""
    from s2ft_serve.adapters.layers import AdapterBatch, S2FTLinear

    torch.manual_seed(0)
    lin = nn.Linear(400, 72, bias=True)  # K in two blocks
    weight, bias = lin.weight.detach().clone(), lin.bias.detach().clone()
    layer = S2FTLinear(lin, AdapterBatch())
    assert layer.weight.is_contiguous() != gemm.column_major_keeps_bits(72, 400)
    for rows in (4, 8, 13, 16, 32, 64, 200):
        x = torch.randn(rows, 400)
        assert torch.equal(layer(x), F.linear(x, weight, bias)), rows


@pytest.mark.parametrize("bias", [False, True])
@torch.inference_mode()
def test_fused_exact_gives_each_linear_its_own_bits_from_one_gemm(monkeypatch, bias):
    """q/k/v-like Linears under `exact`: their weights become views of one tensor (nothing copied for
    good), and one compiled GEMM serves a row count only where every output equals its own Linear's,
    bit for bit; elsewhere the separate ExactLinears serve. (The speed check is forced here: on a tiny
    in-cache probe either may win.)"""
    if native.exact_linear_op() is None:
        pytest.skip("no compiled kernel here")
    monkeypatch.setattr(gemm.ExactLinear, "_faster", staticmethod(lambda form, linear, probe, calls=3: True))
    torch.manual_seed(1)
    layers = [nn.Linear(400, n, bias=bias) for n in (96, 32, 32)]
    originals = [(lin.weight.detach().clone(), lin.bias.detach().clone() if bias else None) for lin in layers]
    dense = DenseGemm(layers, batch_hint=4, onednn=False)
    fused = dense.fused
    assert fused is not None
    for lin, (w, _) in zip(layers, originals):
        assert torch.equal(lin.weight, w) and lin.weight.untyped_storage().data_ptr() == fused.weight.data_ptr()
    served = 0
    big = torch.randn(32, 400)
    for rows in (1, 3, 4, 8, 13, 16, 32):
        x = big[:rows]
        outs = dense(x)
        for got, (w, b), exact in zip(outs, originals, dense.exact):
            if not fused.caps[rows] and exact.chosen.get(rows) == "kernel" and not exact.same_bits[rows]:
                # AVX2 MKL's few-row counts (AMD EPYC): the kernel's blocked order, a larger pass's bits
                assert rows < exact.FEW_ROWS and torch.equal(got, F.linear(big, w, b)[:rows]), rows
            else:
                assert torch.equal(got, F.linear(x, w, b)), rows
        served += bool(fused.caps[rows])
    assert served  # x86 MKL sums in the kernel's order at some of these counts (AVX2 or AVX-512)


def test_fused_exact_is_only_made_where_it_can_serve():
    def of(linears):
        return gemm.FusedExact.of([gemm.ExactLinear(lin) for lin in linears], None)

    mixed_bias = [nn.Linear(16, 8, bias=True), nn.Linear(16, 8, bias=False)]
    assert of(mixed_bias) is None
    assert of([nn.Linear(16, 8)]) is None  # one Linear: nothing to fuse
    assert of([nn.Linear(16, 8).bfloat16(), nn.Linear(16, 8).bfloat16()]) is None
    weights = [lin.weight for lin in mixed_bias]
    DenseGemm(mixed_bias, batch_hint=4, onednn=False)
    assert all(lin.weight is w for lin, w in zip(mixed_bias, weights))  # left as they were


@torch.inference_mode()
def test_merged_reads_bfloat16_delta_rows_as_their_float32_values():
    """An adapter saved in bfloat16 patches the GEMM straight from its bfloat16 rows (no float32 copy per
    pass): the same bits as the same values in float32, both layouts."""
    if native.exact_linear_op() is None:
        pytest.skip("no compiled kernel here")
    op = native.exact_linear_op()
    torch.manual_seed(2)
    for w in (torch.randn(72, 400), torch.randn(400, 72).t()):  # row-major, column-major
        cols = torch.randperm(400)[:19]
        rows = (torch.randn(19, 72) * 0.05).bfloat16()
        x = torch.randn(16, 400)
        got = op(x, w, None, 192, cols, rows)
        assert torch.equal(got, op(x, w, None, 192, cols, rows.float()))
        assert not torch.equal(got, op(x, w, None, 192))

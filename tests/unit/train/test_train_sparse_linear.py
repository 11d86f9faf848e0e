"""Partial back-propagation: the delta gradient equals plain autograd's gradient of those columns."""

from __future__ import annotations

import pytest
import torch

from s2ft_serve.train.sparse_linear import S2FTLinear, SparseColumnLinearFn, unwrap_linears, wrap_linears


def _setup(bias: bool):
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 10, bias=bias)
    index = torch.tensor([3, 7, 8, 20])
    layer = S2FTLinear(base, index)
    with torch.no_grad():
        layer.delta.normal_(0, 0.1)
    x = torch.randn(2, 5, 24, requires_grad=True)
    return base, index, layer, x


@pytest.mark.parametrize("bias", [False, True])
def test_gradients_match_plain_autograd_of_the_columns(bias):
    base, index, layer, x = _setup(bias)
    grad_out = torch.randn(2, 5, 10)
    (layer(x) * grad_out).sum().backward()

    # reference: a plain linear whose whole weight (with the delta merged) requires grad
    merged = base.weight.detach().clone()
    merged[:, index] += layer.delta.detach()
    merged.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, merged, None if base.bias is None else base.bias.detach())
    (y_ref * grad_out).sum().backward()

    torch.testing.assert_close(layer(x.detach()), y_ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.delta.grad, merged.grad[:, index], rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-5)
    assert base.weight.grad is None  # no full-size weight gradient exists
    assert layer.delta.grad.shape == (10, 4)


def test_backward_saves_only_the_selected_input_columns():
    base, index, layer, x = _setup(False)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    activations = [t for t in saved if t.dim() == 3]
    assert [tuple(t.shape) for t in activations] == [(2, 5, 4)]  # x[..., index] only, never x itself
    assert all(t.data_ptr() == base.weight.data_ptr() for t in saved if t.shape == base.weight.shape)


def test_delta_kept_in_float32_under_bfloat16_activations():
    base = torch.nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    layer = S2FTLinear(base, torch.tensor([0, 5]), delta_dtype=torch.float32)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert layer.delta.grad.dtype == torch.float32


def test_wrap_freezes_everything_but_the_deltas_and_unwrap_restores(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    originals = {n: m for n, m in model.named_modules() if n.endswith("o_proj")}
    wrapped = wrap_linears(model, {n: torch.tensor([0, 1]) for n in originals})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"{n}.delta" for n in originals)
    unwrap_linears(model, wrapped)
    assert all(model.get_submodule(n) is m for n, m in originals.items())


def test_function_without_input_grad_gives_only_delta_grad():
    w = torch.randn(4, 6)
    delta = torch.zeros(4, 2, requires_grad=True)
    x = torch.randn(3, 6)
    y = SparseColumnLinearFn.apply(x, w, None, torch.tensor([1, 4]), delta)
    y.sum().backward()
    torch.testing.assert_close(delta.grad, torch.ones(4, 3) @ x[:, [1, 4]])

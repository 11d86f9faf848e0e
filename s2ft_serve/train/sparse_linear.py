"""The S²FT trainable linear layer and its partial back-propagation.

A frozen `nn.Linear` with weight `W [out, in]` gains a trainable column delta `delta [out, k]`
on the input features `index [k]`; its effective weight is `W` with `W[:, index] += delta`.

`SparseColumnLinearFn` computes `y = x @ W.T + x[..., index] @ delta.T (+ bias)`. For the
backward pass it saves only `x[..., index]` (the paper's partial back-propagation: activation
memory is `k / in` of a plain linear layer's), and it never forms a full-size weight gradient:
`grad_delta = grad_y.T @ x[..., index]` is `[out, k]`. The input gradient uses the frozen `W`
plus the delta scattered into its `k` columns, so earlier layers still receive exact gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SparseColumnLinearFn(torch.autograd.Function):
    """`y = F.linear(x, W, b) + x[..., index] @ delta.T`; gradients flow to `x` and `delta` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        x_sel = x.index_select(-1, index)  # [..., k]
        delta_c = delta.to(x.dtype)
        y = F.linear(x, weight, bias) + x_sel @ delta_c.t()  # [..., out]
        ctx.save_for_backward(x_sel, weight, index, delta_c)
        ctx.delta_dtype = delta.dtype
        ctx.x_needs_grad = x.requires_grad
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_sel, weight, index, delta_c = ctx.saved_tensors
        grad_x = grad_delta = None
        if ctx.x_needs_grad:
            grad_x = grad_y @ weight  # [..., in]
            grad_x.index_add_(-1, index, grad_y @ delta_c)  # the delta's share, only on its k columns
        if ctx.needs_input_grad[4]:
            g2 = grad_y.reshape(-1, grad_y.shape[-1])  # [tokens, out]
            xs2 = x_sel.reshape(-1, x_sel.shape[-1])  # [tokens, k]
            grad_delta = (g2.t() @ xs2).to(ctx.delta_dtype)  # [out, k]
        return grad_x, None, None, None, grad_delta


class S2FTLinear(torch.nn.Module):
    """Wraps a frozen `nn.Linear`; only `delta` (`[out, k]`, on columns `index`) is trainable.

    `delta` is kept in `delta_dtype` (float32 by default, a master copy when the base runs in
    bfloat16) and cast to the activations' dtype in the forward pass.
    """

    def __init__(self, base: torch.nn.Linear, index: torch.Tensor, delta_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        index = index.to(device=base.weight.device, dtype=torch.int64)
        self.register_buffer("index", index, persistent=False)
        self.delta = torch.nn.Parameter(
            torch.zeros(base.out_features, index.numel(), device=base.weight.device, dtype=delta_dtype)
        )

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SparseColumnLinearFn.apply(x, self.base.weight, self.base.bias, self.index, self.delta)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, k={self.index.numel()}"


def wrap_linears(model: torch.nn.Module, indices: dict[str, torch.Tensor],
                 delta_dtype: torch.dtype = torch.float32) -> dict[str, S2FTLinear]:
    """Freeze every parameter of `model` and replace each named Linear by an `S2FTLinear`."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: dict[str, S2FTLinear] = {}
    for name, index in indices.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = S2FTLinear(getattr(parent, child), index, delta_dtype)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped


def unwrap_linears(model: torch.nn.Module, wrapped: dict[str, S2FTLinear]) -> None:
    """Put the original frozen Linears back (the deltas are not merged)."""
    for name, layer in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)

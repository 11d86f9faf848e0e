"""Dense projections for the serving forward pass: exact by default, or fused oneDNN GEMMs on CPU.

`gemm="exact"` (the default) computes what the model's own Linears compute, so base-model logits are
bit-identical to transformers': each projection is an `ExactLinear`, which takes a faster form (the
compiled GEMM, or for the LM head MKL's transposed product) for row counts where a probe showed the
very same bits. With AVX2 (AMD EPYC) MKL itself takes other paths for 1-3, 5-7 and 9-11 rows (which
also depend on a weight's layout and memory alignment, see the README); there the compiled GEMM keeps
the order MKL uses for 4+ rows (each row's bits as in a larger pass; within ~5e-5 of transformers'
few-row logits on SmolLM2, as MKL's own results are). With AVX-512 (Intel Xeon) the Linear serves
wherever the kernel does not give its bits. Projections that share an input (q/k/v, gate/up) run as
one compiled GEMM over their weights laid end to end (`FusedExact`) where that too gives each its
Linear's bits and is faster.

`gemm="onednn"` rounds differently; it was faster than MKL's `F.linear` and is about as fast as
`exact` with the compiled GEMM (2-core AMD EPYC):

PyTorch sends a CPU float32 `F.linear` to MKL's sgemm. For decode-sized batches oneDNN's inner
product is faster than it on the CPUs we measured (`benchmarks/engine_throughput.py`; on a 2-core AMD EPYC,
batch 32: the 49k-row LM head 14 ms vs 25-28 ms, a fused gate+up 0.76 ms vs 1.06 ms), and faster
still when the weight is reordered once into oneDNN's blocked layout. So:

- `DenseGemm` runs projections that share an input as one GEMM over their concatenated weights
  (q/k/v, gate/up) or one alone (the LM head), the weight prepacked once in oneDNN's blocked
  layout (an opaque copy; the original modules are then released, see `release`). Where oneDNN
  cannot serve the weight (not on the CPU, float16, or bfloat16 on a CPU without native bfloat16
  arithmetic), it calls the model's own Linears, as `exact` does.
- `onednn_linear` is the unpacked oneDNN call for weights that change in place (the adapted `o_proj` /
  `down_proj`, which fusion edits column by column).

In float32 the results equal `F.linear` up to float rounding (a different summation order), which
is enough to break the engine's 1e-4 correctness contract on a real model: on SmolLM2-135M the logits
differ from transformers' by up to ~2e-4 (of values up to ~40). Hence opt-in. A bfloat16 `F.linear`
on the CPU is itself a oneDNN call; prepacked and fused it gave the very same bits on the AMD EPYC
with AVX-512 BF16 we measured (not promised elsewhere), and a faster decode step.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

from s2ft_serve.adapters import native

_ONEDNN_OPS = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
               and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))

GEMMS = ("exact", "onednn")


@functools.cache
def _onednn_bfloat16() -> bool:
    """Whether oneDNN has a native bfloat16 inner product on this CPU (AVX-512 BF16 or AMX)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_usable(weight: torch.Tensor) -> bool:
    """oneDNN's inner product can serve this weight: CPU float32, or CPU bfloat16 where the CPU has
    native bfloat16 arithmetic (elsewhere oneDNN would emulate it, slower than `F.linear`)."""
    if not _ONEDNN_OPS or weight.device.type != "cpu":
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and _onednn_bfloat16())


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's inner product (the caller checked `onednn_usable` once); the weight is read as it is,
    every call."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


@functools.cache
def column_major_keeps_bits(out_features: int, in_features: int) -> bool:
    """Whether this CPU's float32 `F.linear` gives a column-major [out, in] weight the very bits of the
    row-major one (transformers' layout) from 4 rows on, at every row count a seeded probe tries.
    MKL with AVX2 does; MKL with AVX-512 (Intel Xeon) sums a transposed operand in another order at
    many row counts (up to ~8e-5 apart per projection on SmolLM2, 1.2e-4 in the logits)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g, dtype=torch.float32)
    w_cols = w.t().contiguous().t()
    with torch.inference_mode():
        for rows in (4, 5, 8, 12, 13, 16, 17, 32, 64, 128, 200):
            x = torch.randn(rows, in_features, generator=g, dtype=torch.float32)
            if not torch.equal(F.linear(x, w), F.linear(x, w_cols)):
                return False
    return True


class DenseGemm(nn.Module):
    """Several Linears on the same input; `forward` returns their outputs. Packed, as one oneDNN GEMM."""

    def __init__(self, linears: list[nn.Linear], batch_hint: int, onednn: bool, verdicts: dict | None = None):
        super().__init__()
        self.linears = list(linears)  # a plain list: they stay registered in the model only
        self.packed = onednn and all(onednn_usable(lin.weight) for lin in linears)
        if not self.packed:  # the Linears' bits, faster where verified: as one GEMM, else each alone
            self.exact = [ExactLinear(lin, verdicts=verdicts) for lin in linears]
            self.fused = FusedExact.of(self.exact, verdicts)
            return
        weight = torch.cat([lin.weight.detach() for lin in linears])
        self.splits = [lin.out_features for lin in linears]
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        if any(lin.bias is not None for lin in linears):
            self.bias = torch.cat([lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features)
                                   for lin in linears])
        else:
            self.bias = None
        # an opaque tensor in oneDNN's blocked layout (a plain attribute, not a buffer)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not self.packed:
            outs = self.fused(x) if self.fused is not None else None
            if outs is None:
                outs = tuple(lin(x) for lin in self.exact)
            return outs if len(outs) > 1 else outs[0]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias, "none", [], "")
        y = y.view(*x.shape[:-1], self.out_features)
        return y.split(self.splits, dim=-1) if len(self.splits) > 1 else y


class ExactLinear:
    """A Linear under `gemm="exact"`: `F.linear`'s very bits where MKL sums in its blocked order, and
    that same order where MKL does not (each row the bits of a larger pass); faster at decode sizes
    where MKL's packing dominates (AVX2).

    MKL spends more on packing its operands than on arithmetic at decode-sized row counts. Two faster
    forms compute the same sums in the same order for some row counts:
    - "kernel": the compiled exact GEMM (`adapters/csrc/exact_gemm.cpp`), which reads the weight in
      place and sums every output in MKL's blocked order (blocks of `BLOCKS[0]` input features with
      AVX2, of `BLOCKS[1]` with AVX-512; probed with both); with AVX2 MKL itself uses that order for
      4, 8 and 12 or more rows (so the kernel matches it there), with AVX-512 at fewer counts (from 4,
      16 or 32 rows by shape), and a decode step runs 1.3-2.1x faster at 1-32 rows on AMD EPYC
      (`benchmarks/exact_gemm.py`); `merged` runs it with one adapter's columns patched in;
    - "transposed" (`wide`, the LM head): MKL's own `(W @ x.T).T`, `CHUNK` vocabulary rows at a time,
      the same bits for most counts from 12 rows on; the fallback where the kernel is unavailable.
    Which agree depends on the CPU and the BLAS, so the first pass with a given row count runs the
    forms on a random probe and keeps the first whose every output is bit-identical to the Linear's,
    or the Linear itself where it was faster on the probe (MKL's AVX-512 GEMM can be).
    For 1-3, 5-7 and 9-11 rows MKL takes other paths (AVX2: a vector kernel; the rows past a multiple
    of 4), which no form reproduces; there, where the kernel gave MKL's bits on a 4-row probe, it serves
    anyway: each row gets the bits it gets in any larger pass, and the logits stay as close to
    transformers' as MKL's own few-row results (within ~5e-5 on SmolLM2). Otherwise, and for more than
    `MAX_ROWS` rows, other devices and dtypes, and autograd, it calls the model's own Linear."""

    CHUNK = 2048
    MAX_ROWS = 128
    FEW_ROWS = 12  # below this, MKL's own order depends on the row count
    BLOCKS = (192, 384)  # MKL sgemm's blocks of input features: with AVX2 (AMD EPYC), with AVX-512 (Intel Xeon)

    def __init__(self, linear: nn.Linear, wide: bool = False, verdicts: dict | None = None):
        # a plain object, not a Module (its call runs in every projection of every step): the Linear
        # stays registered in the model only
        self.linears = [linear]
        w = linear.weight
        self.eligible = w.device.type == "cpu" and w.dtype == torch.float32
        self.op = native.exact_linear_op() if self.eligible else None  # resolved once: it runs every step
        self.forms = {"kernel": self._kernel}
        if wide and linear.bias is None:
            self.forms["transposed"] = self._transposed
        self.chosen: dict[int, str | None] = {}  # row count -> the form that serves it, or None: the Linear
        self.same_bits: dict[int, bool] = {}  # row count -> the chosen form gives the Linear's very bits
        self.caps: dict[int, int] = {}  # row count -> the kernel's block of input features (BLOCKS), or 0
        # Probe results shared by the projections of one model: which form agrees depends on the shapes,
        # the layout and the alignment, never on the values, so a model's ~200 projections need ~10 probes
        # per row count (a first step at a new count then costs ~5 ms more, not ~0.1-0.5 s).
        self.verdicts = verdicts if verdicts is not None else {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.linears[0]
        rows = x.numel() // x.shape[-1]
        form = self.chosen.get(rows, "")
        if form is None or not self.eligible or rows > self.MAX_ROWS or torch.is_grad_enabled():
            return linear(x)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # laid out as the probe is
        if form == "":
            form = self._choose(rows)
            if form is None:
                return linear(x)
        y = self.forms[form](x2)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _choose(self, rows: int) -> str | None:
        linear = self.linears[0]
        w = linear.weight
        key = (rows, tuple(w.shape), w.stride(), w.data_ptr() % 64, linear.bias is not None, tuple(self.forms))
        if key not in self.verdicts:
            self.verdicts[key] = self._probe(rows)
        # caps: the kernel's block where it sums in MKL's blocked order at this count (see `merged`), else 0
        self.chosen[rows], self.same_bits[rows], self.caps[rows] = self.verdicts[key]
        return self.chosen[rows]

    def _probe(self, rows: int) -> tuple[str | None, bool, int]:
        """(the form that serves `rows`, None for the Linear; whether that gives the Linear's bits; the
        kernel's block where the kernel sums in MKL's blocked order at this count, else 0)"""
        linear = self.linears[0]
        w = linear.weight
        # a random probe, so no input can pass by chance (zeros would)
        probe = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(rows), dtype=w.dtype)
        want = linear(probe)
        for name, form in self.forms.items():
            for cap in self.BLOCKS if name == "kernel" else (0,):
                self.caps[rows] = cap
                try:
                    if torch.equal(form(probe), want):
                        # the very bits either way: the faster serves (with AVX-512, MKL's own GEMM can be)
                        return (name if self._faster(form, linear, probe) else None), True, cap
                except RuntimeError:  # no compiled kernel here, or a weight layout it does not take
                    break
            if name == "kernel" and rows < self.FEW_ROWS and rows != 4:
                if 4 not in self.chosen:
                    self._choose(4)
                if self.caps.get(4) == self.BLOCKS[0]:
                    # AVX2: the blocked order MKL uses from 4 rows (each row's bits as in a larger pass),
                    # faster than MKL's few-row paths; with AVX-512 those are fast: the Linear serves
                    return "kernel", False, self.caps[4]
                if self.caps.get(4):
                    return None, False, self.caps[4]  # still the kernel's order for `merged`
        return None, False, 0

    @staticmethod
    def _faster(form, linear, probe: torch.Tensor, calls: int = 3) -> bool:
        """Whether `form` beats the Linear on the probe (the best of a few calls each, interleaved)."""
        best = [float("inf"), float("inf")]
        for _ in range(calls):
            for i, fn in enumerate((form, linear)):
                start = time.perf_counter()
                fn(probe)
                best[i] = min(best[i], time.perf_counter() - start)
        return best[0] <= best[1]

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.op is None:
            raise RuntimeError("the compiled kernels are unavailable")
        linear = self.linears[0]
        return self.op(x, linear.weight, linear.bias, self.caps[x.shape[0]])

    def merged(self, x: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """`x @ W'.T (+ bias)` for `W' = W` with `W'[:, cols] += rows.T`, each sum rounded to float32 as
        merging stores it, without building W': the compiled GEMM reads those columns patched on the fly.
        So one adapter's pass gets the bits of a model with the adapter merged, wherever the kernel serves
        this row count (the same order as the base pass); None where it does not (the caller then adds
        the correction to the base pass). cols: [k] int64, rows: [k, out] float32 or bfloat16 (contiguous)."""
        n = x.numel() // x.shape[-1]
        if not self.eligible or n > self.MAX_ROWS or torch.is_grad_enabled():
            return None
        if n not in self.chosen:
            self._choose(n)
        if not self.caps.get(n):  # MKL sums otherwise at this count
            return None
        linear = self.linears[0]
        y = self.op(x.reshape(n, x.shape[-1]).contiguous(), linear.weight, linear.bias, self.caps[n], cols, rows)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _transposed(self, x: torch.Tensor) -> torch.Tensor:
        w = self.linears[0].weight
        y = x.new_empty(x.shape[0], w.shape[0])
        xt = x.t()
        for start in range(0, w.shape[0], self.CHUNK):
            block = w[start : start + self.CHUNK]
            y[:, start : start + block.shape[0]] = torch.mm(block, xt).t()
        return y


class FusedExact:
    """Linears that share an input (q/k/v, gate/up) as one compiled GEMM over their weights laid end to
    end: each output element is the same chain of products either way, so where a probe shows every
    output with its own Linear's very bits at a row count (and the one call beats the separate ones,
    as it does at decode sizes with AVX-512: one pass over the input, one thread split), it serves
    that count; elsewhere the caller runs the separate `ExactLinear`s. The Linears' weights become
    views of the one tensor, so nothing is copied for good."""

    def __init__(self, separate: list[ExactLinear], verdicts: dict | None = None):
        self.separate = separate  # what serves otherwise, and what the fused call must beat
        self.linears = linears = [e.linears[0] for e in separate]
        self.splits = [lin.out_features for lin in linears]
        with torch.no_grad():
            self.weight = torch.cat([lin.weight.detach() for lin in linears])
            self.bias = torch.cat([lin.bias.detach() for lin in linears]) if linears[0].bias is not None else None
            start = 0
            for lin, n in zip(linears, self.splits):  # the Linears read the one tensor from now on
                lin.weight = nn.Parameter(self.weight[start : start + n], requires_grad=False)
                if self.bias is not None:
                    lin.bias = nn.Parameter(self.bias[start : start + n], requires_grad=False)
                start += n
        self.op = native.exact_linear_op()
        self.caps: dict[int, int] = {}  # row count -> the kernel's block where the fused call serves, else 0
        self.verdicts = verdicts if verdicts is not None else {}

    @classmethod
    def of(cls, separate: list[ExactLinear], verdicts: dict | None) -> "FusedExact | None":
        """A fused form of the Linears behind `separate`, or None where there is nothing to fuse or no
        kernel to fuse with (one Linear; not CPU float32; different inputs, layouts or bias-ness; no
        compiled kernel)."""
        linears = [e.linears[0] for e in separate]
        w = linears[0].weight
        if len(linears) < 2 or w.device.type != "cpu" or w.dtype != torch.float32:
            return None
        if any(lin.weight.dtype != w.dtype or lin.in_features != linears[0].in_features or
               not lin.weight.is_contiguous() or (lin.bias is None) != (linears[0].bias is None) for lin in linears):
            return None
        return cls(separate, verdicts) if native.exact_linear_op() is not None else None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The Linears' outputs from one GEMM, or None where the fused call does not serve this count."""
        rows = x.numel() // x.shape[-1]
        if rows > ExactLinear.MAX_ROWS or torch.is_grad_enabled():
            return None
        cap = self.caps.get(rows)
        if cap is None:
            cap = self._choose(rows)
        if not cap:
            return None
        y = self.op(x.reshape(rows, x.shape[-1]).contiguous(), self.weight, self.bias, cap)
        return tuple(y.view(*x.shape[:-1], y.shape[-1]).split(self.splits, dim=-1))

    def _choose(self, rows: int) -> int:
        key = ("fused", rows, tuple(self.weight.shape), tuple(self.splits), self.weight.data_ptr() % 64,
               self.bias is not None)
        if key not in self.verdicts:
            self.verdicts[key] = self._probe(rows)
        self.caps[rows] = self.verdicts[key]
        return self.caps[rows]

    def _probe(self, rows: int) -> int:
        # in the weight's dtype whatever torch's default (transformers changes it while loading a model, in any thread)
        probe = torch.randn(rows, self.weight.shape[1], generator=torch.Generator().manual_seed(rows),
                            dtype=self.weight.dtype)
        with torch.inference_mode():
            want = torch.cat([lin(probe) for lin in self.linears], dim=-1)
            for e in self.separate:  # each chooses its own form for this count first
                e(probe)
            for cap in ExactLinear.BLOCKS:
                fused = functools.partial(self.op, w=self.weight, bias=self.bias, block_cap=cap)
                if torch.equal(fused(probe), want):
                    faster = ExactLinear._faster(fused, lambda p: [e(p) for e in self.separate], probe)
                    return cap if faster else 0
        return 0


class Released(nn.Module):
    """Stands in for a Linear whose weight now lives only in a packed `DenseGemm`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this projection's weight was moved into the serving engine's packed GEMM; "
                           "load a separate transformers model to run it outside the engine")


def release(parent: nn.Module, names: list[str]) -> None:
    """Drop the original Linears `parent.<name>` once a packed copy of their weights exists."""
    for name in names:
        setattr(parent, name, Released(getattr(parent, name)))

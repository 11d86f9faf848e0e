"""The adapted Linear: a shared base matmul plus per-token S²FT column corrections.

`S2FTLinear` wraps one `o_proj` / `down_proj`. It knows slots, never requests: the registry
installs an adapter's columns with `set_slot(slot, index, delta)` and clears them with
`reset_slot(slot)`; the runner sets one `AdapterBatch` per forward pass (shared by every layer)
that says which slots each token uses. Slot 0 is the null slot (no correction). On CPU float32 and
bfloat16, mixed decode steps and passes of short rows go through the compiled kernel (`native`) where
it is available, else through `ops.mixed_delta` / `ops.row_delta`.

Where that kernel serves a float32 model, a module's table is bfloat16 while every delta it holds is a
bfloat16 value (an adapter saved in bfloat16, as most fine-tunes are): the kernel widens each value
exactly, so the results are the float32 table's bit for bit, and a mixed step reads half the bytes
(it is bound by that read). The first delta that bfloat16 cannot hold exactly widens the table to float32; it
narrows again once no such delta is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from s2ft_serve.adapters import native
from s2ft_serve.adapters.ops import mixed_delta, row_delta, segment_delta
from s2ft_serve.model.gemm import ExactLinear, column_major_keeps_bits, onednn_linear, onednn_usable

NULL_SLOT = 0
# A pass of prompts with different adapters ("rows": a speculative verify pass, a burst of short
# prompts) goes through the compiled kernel when its rows are at most this long: it reads each
# prompt's columns in place, where `row_delta` copies them first; from ~32 tokens per row the
# batched matmul catches up (benchmarks/adapter_kernel.py --rows-lengths).
NATIVE_MAX_ROW_LEN = 16


def pad_slots(slot_tuples: list[tuple[int, ...]], width: int) -> list[list[int]]:
    """Each sequence's slots, padded with the null slot to `width`: one row of a [B, width] slot tensor."""
    return [list(t) + [NULL_SLOT] * (width - len(t)) for t in slot_tuples]


@dataclass
class AdapterBatch:
    """Token -> slots layout of one forward pass, set by the runner once per step."""

    single_slots: tuple[int, ...] = ()  # slots applied to every token (mode "single")
    token_slots: torch.Tensor | None = None  # [T, m] per-token (mode "mixed") or [P, m] per-row ("rows") slots
    mode: str = "none"  # "none" | "single" | "mixed" | "rows"
    tables: int = 0  # bumped whenever a module's slot tables are reallocated (CUDA graphs read them in place)
    _per_token: torch.Tensor | None = None  # "rows": each prompt's slots repeated on its L tokens, [P * L, m]

    def set_none(self) -> None:
        self.mode, self.single_slots, self.token_slots, self._per_token = "none", (), None, None

    def set_single(self, slots: tuple[int, ...]) -> None:
        slots = tuple(s for s in slots if s != NULL_SLOT)
        self.mode = "single" if slots else "none"
        self.single_slots, self.token_slots, self._per_token = slots, None, None

    def set_mixed(self, token_slots: torch.Tensor) -> None:
        self.mode, self.single_slots, self.token_slots, self._per_token = "mixed", (), token_slots, None

    def set_rows(self, row_slots: torch.Tensor) -> None:
        """A batched prefill (x: [P, L, in]) whose P prompts use different slots: one tuple per prompt."""
        self.mode, self.single_slots, self.token_slots, self._per_token = "rows", (), row_slots, None

    def per_token(self, length: int) -> torch.Tensor:
        """Every token's slots, [T, m]: as given ("mixed"), or ("rows") each prompt's repeated on its
        `length` tokens, worked out once per pass for all the modules that ask."""
        if self.mode != "rows":
            return self.token_slots
        if self._per_token is None or self._per_token.shape[0] != self.token_slots.shape[0] * length:
            self._per_token = self.token_slots.repeat_interleave(length, dim=0)
        return self._per_token


@dataclass
class SlotTable:
    """Rows of `delta.T` for every slot of one module, padded to `k_cap` rows per slot."""

    table: torch.Tensor  # [capacity * k_cap + 1, out]; the last row is all zeros
    rows: torch.Tensor  # [capacity + 1, k_cap] int64; row 0 (null slot) is all padding
    cols: torch.Tensor  # [capacity + 1, k_cap] int64
    ks: torch.Tensor  # [capacity + 1] int64, columns per slot (read by the compiled kernel)
    slot_k: list[int] = field(default_factory=list)  # the same as a list, for Python-side checks
    narrow: list[bool] = field(default_factory=list)  # per slot: its delta is exactly bfloat16 values

    @property
    def capacity(self) -> int:
        return len(self.slot_k) - 1

    @property
    def k_cap(self) -> int:
        return self.rows.shape[1]

    def columns(self, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Slot `slot`'s (index [k], delta.T [k, out]) as views, or None where it holds no columns."""
        k = self.slot_k[slot] if slot <= self.capacity else 0
        if not k:
            return None
        start = (slot - 1) * self.k_cap
        return self.cols[slot, :k], self.table[start : start + k]


class S2FTLinear(nn.Module):
    def __init__(self, base: nn.Linear, batch: AdapterBatch, onednn: bool = False, kernel: str = "auto",
                 verdicts: dict | None = None):
        super().__init__()
        self.base = base
        self.batch = batch
        # the base matmul through oneDNN (see model.gemm), decided once; else F.linear, as transformers
        self.onednn = onednn and onednn_usable(base.weight)
        self.native = native.resolve(kernel, base.weight)  # the compiled mixed-step kernel, or None
        w = base.weight
        if w.device.type != "cpu" or (w.dtype == torch.float32 and column_major_keeps_bits(*w.shape)):
            # Column-major storage: each input column is contiguous, so fusing or unfusing an adapter
            # (W[:, index] += delta) is a sequential copy instead of a cache miss per element. Only where
            # the CPU's float32 GEMM gives it the row-major weight's bits (MKL with AVX2: from 4 rows on;
            # MKL with AVX-512 sums a transposed operand otherwise, see gemm.column_major_keeps_bits).
            # bfloat16 CPU GEMM is much slower column-major, so it stays.
            with torch.no_grad():
                base.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=False)
        self.in_features, self.out_features = base.in_features, base.out_features
        # a float32 module keeps a bfloat16 table where deltas allow it: the compiled kernel reads one
        self.compact = self.native is not None and w.dtype == torch.float32
        self.slots = self._empty(capacity=0, k_cap=1, dtype=torch.bfloat16 if self.compact else w.dtype)
        # without oneDNN: the base matmul in MKL's order, compiled where verified
        self.exact = None if self.onednn else ExactLinear(base, verdicts=verdicts)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def _empty(self, capacity: int, k_cap: int, dtype: torch.dtype) -> SlotTable:
        w = self.base.weight
        table = torch.zeros(capacity * k_cap + 1, self.out_features, dtype=dtype, device=w.device)
        zero_row = capacity * k_cap
        rows = torch.full((capacity + 1, k_cap), zero_row, dtype=torch.int64, device=w.device)
        cols = torch.zeros(capacity + 1, k_cap, dtype=torch.int64, device=w.device)
        ks = torch.zeros(capacity + 1, dtype=torch.int64, device=w.device)
        return SlotTable(table, rows, cols, ks, [0] * (capacity + 1), [True] * (capacity + 1))

    def reserve(self, capacity: int, k: int) -> None:
        """Grow to hold `capacity` slots of up to `k` columns each (copies the live slots)."""
        old = self.slots
        if capacity <= old.capacity and k <= old.k_cap:
            return
        self._copy(old, self._empty(max(capacity, old.capacity), max(k, old.k_cap), old.table.dtype))

    def _copy(self, old: SlotTable, new: SlotTable) -> None:
        for slot in range(1, old.capacity + 1):
            if old.slot_k[slot]:
                self._write(new, slot, *old.columns(slot), narrow=old.narrow[slot])
        self.slots = new
        self.batch.tables += 1

    def _retype(self, dtype: torch.dtype, k_cap: int | None = None) -> None:
        old = self.slots
        k_cap = k_cap or old.k_cap
        if old.table.dtype != dtype or old.k_cap != k_cap:
            self._copy(old, self._empty(old.capacity, k_cap, dtype))

    def set_slot(self, slot: int, index: torch.Tensor, delta: torch.Tensor) -> None:
        """Install `W[:, index] += delta` as slot `slot` (delta: [out, k])."""
        assert slot != NULL_SLOT
        self.reserve(slot, index.numel())
        w = self.base.weight
        delta_t = delta.t().to(w.device, w.dtype)
        narrow = self.compact and bool(torch.equal(delta_t.to(torch.bfloat16).to(w.dtype), delta_t))
        if not narrow:
            self._retype(w.dtype)  # widen, exactly, before the table would round this delta
        self._write(self.slots, slot, index.to(w.device), delta_t, narrow)

    def reset_slot(self, slot: int) -> None:
        s = self.slots
        if slot <= s.capacity and s.slot_k[slot]:
            start = (slot - 1) * s.k_cap
            s.table[start : start + s.slot_k[slot]].zero_()
            s.rows[slot].fill_(s.table.shape[0] - 1)
            s.cols[slot].zero_()
            s.slot_k[slot] = 0
            s.ks[slot] = 0
            s.narrow[slot] = True
            # narrow again once no delta needs float32; shrink once the widest slot left needs at most half
            # the rows each slot has (every slot is padded to the widest: one wide adapter, gone, kept them all
            # wide, as much as 20x the memory)
            need = max(s.slot_k)
            self._retype(torch.bfloat16 if self.compact and all(s.narrow) else s.table.dtype,
                         max(need, 1) if 2 * need <= s.k_cap else None)

    @staticmethod
    def _write(s: SlotTable, slot: int, index: torch.Tensor, delta_t: torch.Tensor, narrow: bool) -> None:
        k = index.numel()
        start = (slot - 1) * s.k_cap
        s.table[start : start + k] = delta_t  # exact: a bfloat16 table only takes narrow deltas
        s.table[start + k : start + s.k_cap].zero_()
        s.rows[slot].fill_(s.table.shape[0] - 1)
        s.rows[slot, :k] = torch.arange(start, start + k, device=s.rows.device)
        s.cols[slot].zero_()
        s.cols[slot, :k] = index
        s.slot_k[slot] = k
        s.ks[slot] = k
        s.narrow[slot] = narrow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.batch
        if b.mode == "single" and len(b.single_slots) == 1 and self.exact is not None:
            # one adapter for the whole pass: the merged weight's very sums, its columns patched on the fly
            y = self._merged(x, b.single_slots[0])
            if y is not None:
                return y
        # both read the weight as it is: fusion edits it in place
        y = self.exact(x) if self.exact else onednn_linear(x, self.base.weight, self.base.bias)
        if b.mode == "none":
            return y
        x2 = x.reshape(-1, self.in_features)  # [T, in]
        y2 = y.view(-1, self.out_features)  # [T, out]
        if b.mode == "single":
            self._add_segment(y2, x2, b.single_slots)
            return y
        s = self.slots
        slots = b.token_slots  # the registry reserves every slot in every module
        # the kernel is inference-only: y also needs a gradient where the base weight does
        differentiable = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
        if self.native is not None and not differentiable and (b.mode == "mixed" or x.shape[-2] <= NATIVE_MAX_ROW_LEN):
            # adds into y in place; "rows": each prompt's slots on every one of its tokens
            self.native(y2, x2.contiguous(), s.table, b.per_token(x.shape[-2]), s.ks, s.cols)
            return y
        n = slots.shape[0]  # tokens ("mixed") or prompts ("rows")
        rows, cols = s.rows[slots].view(n, -1), s.cols[slots].view(n, -1)  # [n, m*k_cap]
        if b.mode == "rows":
            y += row_delta(x, s.table, rows, cols)
        else:
            y2 += mixed_delta(x2, s.table, rows, cols)
        return y

    def _merged(self, x: torch.Tensor, slot: int) -> torch.Tensor | None:
        columns = self.slots.columns(slot)
        if not columns:
            return None
        return self.exact.merged(x, *columns)  # the GEMM widens bfloat16 delta rows itself

    def _add_segment(self, y2: torch.Tensor, x2: torch.Tensor, slots: tuple[int, ...]) -> None:
        """y2 += every slot's correction, for tokens x2 [T, in] that all use `slots`."""
        for slot in slots:
            columns = self.slots.columns(slot)
            if columns:
                index, delta_t = columns
                y2 += segment_delta(x2, delta_t.to(x2.dtype), index)


def wrap_model(model: nn.Module, targets: dict[str, nn.Linear], batch: AdapterBatch,
               onednn: bool = False, kernel: str = "auto", verdicts: dict | None = None) -> dict[str, S2FTLinear]:
    """Replace every target Linear in `model` by an S2FTLinear sharing `batch`; return them by name."""
    wrapped = {}
    for name, base in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = S2FTLinear(base, batch, onednn, kernel, verdicts)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped

"""Decode steps replayed as CUDA graphs.

A small model's decode step on a GPU is bound by the host launching its kernels, not by the GPU
(SmolLM2-135M on an H200: ~1,250 launches, 18.6 ms per step, the GPU busy for ~2.6 ms of it). A
captured CUDA graph launches them all at once. Each graph serves one shape:

- a batch bucket: 1, 2, 4, 8, then multiples of 8 up to max_batch_size. A step's B sequences are
  rows 0..B-1 (the scheduler keeps them so); rows B..bucket-1 are padding: token 0 at position 0
  (so every layer's mask lets it see one key and its output stays finite), the null slot, and its
  keys and values written at position max_len - 1 of its own row, which no sequence reads before
  writing it itself (batched prefill sends its padding there too);
- a span bucket: the cache positions attended over, 256, 512, ... up to max_model_len;
- the slots per token: 0 (no adapter in the step) or m (the mixed-step kernel reads [bucket, m]
  slots: a step of one adapter goes through it too).

The step's inputs are copied into the graph's own tensors, which it reads in place; so does everything
else it touches: the weights (fusion edits them in place), the KV cache, the adapters' slot tables.
A table that is reallocated (an adapter with more columns, a float32 delta in a bfloat16 table) bumps
`AdapterBatch.tables`, and every graph is dropped, to be captured again when next used.

Graphs are captured the first time their shape is used, and kept only if their first replay gives
the eager step they recorded; a capture that fails either way turns graphs off for the engine
(logged once) and the step runs eagerly, as it does where no graph serves: speculative
verify passes, a model whose rotary angles depend on the length (dynamic NTK, LongRoPE). With
`capture=False` the same padded, static-shape step runs eagerly (how tests check it on a CPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from s2ft_serve.adapters.layers import AdapterBatch
from s2ft_serve.model.forward import Transformer

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    return sorted({b for b in (1, 2, 4, 8, *range(16, max_batch + 8, 8)) if b < max_batch} | {max_batch})


def span_buckets(max_len: int) -> list[int]:
    spans, span = [], 256
    while span < max_len:
        spans.append(span)
        span *= 2
    return spans + [max_len]


def length_dependent_rotary(config) -> bool:
    """Rotary angles that depend on the longest position (transformers reads it on the host each pass)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    rope = rope if isinstance(rope, dict) else {}
    return (rope.get("rope_type") or rope.get("type")) in ("dynamic", "longrope")


@dataclass
class _Step:
    """One shape's inputs and outputs, read and written in place by its graph."""

    tokens: torch.Tensor  # [bucket, 1]
    positions: torch.Tensor  # [bucket, 1]
    write_slots: torch.Tensor  # [bucket * kv_heads] flat cache indices
    slots: torch.Tensor | None  # [bucket, m], or None: no adapter
    graph: "torch.cuda.CUDAGraph | None" = None
    logits: torch.Tensor | None = None  # [bucket, vocab] float32, what the graph writes


class DecodeGraphs:
    def __init__(self, model: Transformer, batch: AdapterBatch, max_batch: int, capture: bool = True):
        self.model, self.batch = model, batch
        self.sizes = batch_buckets(max_batch)
        self.spans = span_buckets(model.max_len)
        self.capture = capture
        self.steps: dict[tuple[int, int, int], _Step] = {}
        self.tables = batch.tables
        self.pool = None  # the memory pool every graph shares, made at the first capture
        self.failed = False
        self.captured = 0  # graphs captured since start (a shape captured again after a table change counts again)

    def decode(self, tokens: list[int], positions: list[int], slot_tuples: list[tuple[int, ...]]) -> torch.Tensor | None:
        """Logits [B, vocab] float32 of one decode step of rows 0..B-1, or None where no graph serves it."""
        if self.failed:
            return None
        B = len(tokens)
        size = next((s for s in self.sizes if s >= B), None)
        span = next((s for s in self.spans if s > max(positions)), None)
        if size is None or span is None:
            return None
        width = max(len(t) for t in slot_tuples)
        if self.batch.tables != self.tables:  # a slot table moved: every graph reads the old one
            self.steps.clear()
            self.tables = self.batch.tables
        step = self.steps.get((size, span, width))
        if step is None:
            step = self.steps[(size, span, width)] = self._new_step(size, width)
        self._fill(step, tokens, positions, slot_tuples)
        if step.graph is None and self.capture:
            try:
                self._capture(step, span)  # its check replays this step
            except Exception as e:  # noqa: BLE001 - any capture failure: serve eagerly from now on
                log.warning("CUDA graph capture failed (%s: %s); decode steps run eagerly", type(e).__name__, e)
                self.failed = True
                self.steps.clear()
                return None
        elif step.graph is not None:
            step.graph.replay()
        else:
            step.logits = self._run(step, span)
        return step.logits[:B].clone()

    def _new_step(self, size: int, width: int) -> _Step:
        device = self.model.device
        zeros = dict(dtype=torch.int64, device=device)
        return _Step(torch.zeros(size, 1, **zeros), torch.zeros(size, 1, **zeros),
                     torch.zeros(size * self.model.num_kv_heads, **zeros),
                     torch.zeros(size, width, **zeros) if width else None)

    def _fill(self, step: _Step, tokens: list[int], positions: list[int], slot_tuples: list[tuple[int, ...]]) -> None:
        """Copy this step's inputs into the shape's tensors (one host-to-device copy each); padding rows as
        the module docstring says."""
        size, B = step.tokens.shape[0], len(tokens)
        pad = size - B
        step.tokens.copy_(torch.tensor(tokens + [0] * pad)[:, None])
        step.positions.copy_(torch.tensor(positions + [0] * pad)[:, None])
        at = torch.tensor(positions + [self.model.max_len - 1] * pad)
        heads = self.model.num_kv_heads
        flat = (torch.arange(size)[:, None] * heads + torch.arange(heads)[None, :]) * self.model.max_len + at[:, None]
        step.write_slots.copy_(flat.reshape(-1))
        if step.slots is not None:
            width = step.slots.shape[1]
            step.slots.copy_(torch.tensor([list(t) + [0] * (width - len(t)) for t in slot_tuples] + [[0] * width] * pad))

    def _run(self, step: _Step, span: int) -> torch.Tensor:
        """The step, eagerly, on the shape's tensors."""
        if step.slots is None:
            self.batch.set_none()
        else:
            self.batch.set_mixed(step.slots)
        try:
            return self.model(step.tokens, step.positions, slice(0, step.tokens.shape[0]), cached=True, span=span,
                              write_slots=step.write_slots)
        finally:
            self.batch.set_none()

    def _capture(self, step: _Step, span: int) -> None:
        # once eagerly first, on a side stream as PyTorch's recipe asks: Triton compiles its kernel and
        # cuBLAS sets up its workspace outside the capture; it computes this very step (the replay that
        # follows writes the same keys and values again)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager = self._run(step, span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # thread_local: another thread's CUDA work (an adapter copied to the GPU) may not fail this capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self._run(step, span)
        # a graph is used only if its first replay gives the step it recorded (the same kernels on the
        # same inputs: equal but for a GEMM that picks another algorithm under capture)
        graph.replay()
        tol = 1e-4 if self.model.cache.k.dtype == torch.float32 else 2e-2
        if not torch.allclose(logits, eager, rtol=tol, atol=tol):
            raise RuntimeError(f"its replay differed from the eager step by up to "
                               f"{(logits - eager).abs().max().item():.3g}")
        step.graph, step.logits = graph, logits
        self.captured += 1
        log.debug("captured a decode step: batch %d, span %d, slots per token %d", step.tokens.shape[0], span,
                  0 if step.slots is None else step.slots.shape[1])

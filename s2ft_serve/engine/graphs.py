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

Graphs are captured the first time their shape is used, on the engine's own stream (one capture at
a time in the process), and kept only if their first replay gives the eager step they recorded; a
capture that fails either way turns graphs off for the engine (logged with its traceback;
`S2FT_CUDA_GRAPHS_STRICT=1` raises instead, for tests and debugging) and the step runs eagerly, as
it does where no graph serves: speculative verify passes, a model whose rotary angles depend on the
length (dynamic NTK, LongRoPE). With `capture=False` the same padded, static-shape step runs eagerly
(how tests check it on a CPU).

Every graph ends by copying its logits into one output tensor of `max_batch_size` rows, which
`decode` copies out at once: graphs share one memory pool and replay in any order, so nothing a
graph wrote may be read after another graph's replay.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import torch

from s2ft_serve.adapters.layers import AdapterBatch, pad_slots
from s2ft_serve.model.forward import Transformer

log = logging.getLogger(__name__)

_CAPTURE = threading.Lock()  # torch.cuda.graph: one capture at a time in the process


def batch_buckets(max_batch: int) -> list[int]:
    return sorted({b for b in (1, 2, 4, 8, *range(16, max_batch + 8, 8)) if b < max_batch} | {max_batch})


def span_buckets(max_len: int) -> list[int]:
    spans, span = [], 256
    while span < max_len:
        spans.append(span)
        span *= 2
    return spans + [max_len]


def length_dependent_rotary(hf_model) -> bool:
    """Rotary angles that depend on the longest position: transformers reads it on the host each pass
    and replaces `inv_freq` (its own test, on the rotary module, or the config where it has none)."""
    rope_type = getattr(getattr(hf_model.model, "rotary_emb", None), "rope_type", None)
    if rope_type is None:
        config = hf_model.config
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        rope = rope if isinstance(rope, dict) else {}
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
    return "dynamic" in rope_type or rope_type == "longrope"


@dataclass
class _Step:
    """One shape's inputs, read in place by its graph: views of one device tensor, filled by one copy."""

    inputs: torch.Tensor  # [tokens | positions | write_slots | slots], int64
    tokens: torch.Tensor  # [bucket, 1]
    positions: torch.Tensor  # [bucket, 1]
    write_slots: torch.Tensor  # [bucket * kv_heads] flat cache indices
    slots: torch.Tensor | None  # [bucket, m], or None: no adapter
    graph: "torch.cuda.CUDAGraph | None" = None


class DecodeGraphs:
    def __init__(self, model: Transformer, batch: AdapterBatch, max_batch: int, capture: bool = True):
        self.model, self.batch = model, batch
        self.sizes = batch_buckets(max_batch)
        self.spans = span_buckets(model.max_len)
        self.capture = capture
        self.strict = os.environ.get("S2FT_CUDA_GRAPHS_STRICT") == "1"
        self.steps: dict[tuple[int, int, int], _Step] = {}
        self.tables = batch.tables
        self.stream = self.pool = None  # the stream every capture runs on and the memory pool graphs share
        self.out: torch.Tensor | None = None  # [max_batch, vocab] float32: every graph's logits end here
        self.failed = False
        self.captured = 0  # graphs captured since start (a shape captured again after a table change counts again)

    def decode(self, tokens: list[int], positions: list[int], slot_tuples: list[tuple[int, ...]]) -> torch.Tensor | None:
        """Logits [B, vocab] float32 of one decode step of rows 0..B-1, or None where no graph serves it."""
        if self.failed:
            return None
        B = len(tokens)
        size = next((s for s in self.sizes if s >= B), None)
        if size is None:  # more rows than a batch holds (the runner's spare row)
            return None
        span = next(s for s in self.spans if s > max(positions))  # positions < max_model_len, the last bucket
        width = max(len(t) for t in slot_tuples)
        if self.batch.tables != self.tables:  # a slot table moved: the graphs of adapter steps read the old one
            self.steps = {key: step for key, step in self.steps.items() if step.slots is None}
            self.tables = self.batch.tables
        step = self.steps.get((size, span, width))
        if step is None:
            step = self.steps[(size, span, width)] = self._new_step(size, width)
        self._fill(step, tokens, positions, slot_tuples)
        if not self.capture:
            return self._run(step, span)[:B]
        if step.graph is None:
            try:
                self._capture(step, span, B)  # its check replays this step
            except Exception as e:  # noqa: BLE001 - any capture failure: serve eagerly from now on
                if self.strict:
                    raise
                log.warning("CUDA graph capture failed (%s: %s); decode steps run eagerly", type(e).__name__, e,
                            exc_info=True)
                self.failed = True
                self.steps.clear()
                return None
        else:
            step.graph.replay()
        return self.out[:B].clone()  # now: the next replay may write where this graph's own tensors were

    def _new_step(self, size: int, width: int) -> _Step:
        heads = self.model.num_kv_heads
        inputs = torch.zeros(size * (2 + heads + width), dtype=torch.int64, device=self.model.device)
        tokens, positions, write_slots, slots = inputs.split([size, size, size * heads, size * width])
        return _Step(inputs, tokens.view(size, 1), positions.view(size, 1), write_slots,
                     slots.view(size, width) if width else None)

    def _fill(self, step: _Step, tokens: list[int], positions: list[int], slot_tuples: list[tuple[int, ...]]) -> None:
        """This step's inputs into the shape's tensors, in one host-to-device copy; padding rows as the
        module docstring says."""
        size = step.tokens.shape[0]
        pad = size - len(tokens)
        at = torch.tensor(positions + [self.model.max_len - 1] * pad)[:, None]  # where each row's keys and values go
        parts = [torch.tensor(tokens + [0] * pad), torch.tensor(positions + [0] * pad),
                 self.model.cache_slots(slice(0, size), at)]
        if step.slots is not None:
            parts.append(torch.tensor(pad_slots(slot_tuples + [()] * pad, step.slots.shape[1])).view(-1))
        step.inputs.copy_(torch.cat(parts))

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

    def _capture(self, step: _Step, span: int, B: int) -> None:
        size = step.tokens.shape[0]
        with _CAPTURE, torch.cuda.device(self.model.device):
            current = torch.cuda.current_stream()
            if self.stream is None:
                self.stream, self.pool = torch.cuda.Stream(), torch.cuda.graph_pool_handle()
            try:
                # once eagerly first, on the capture's stream as PyTorch's recipe asks: Triton compiles its
                # kernel and cuBLAS sets up its workspace outside the capture; it computes this very step (the
                # replay below writes the same keys and values again)
                self.stream.wait_stream(current)
                with torch.cuda.stream(self.stream):
                    eager = self._run(step, span)
                current.wait_stream(self.stream)
                if self.out is None:
                    self.out = torch.empty(self.sizes[-1], eager.shape[1], dtype=eager.dtype, device=eager.device)
                graph = torch.cuda.CUDAGraph()
                # thread_local: another thread's CUDA work may not fail this capture
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                    self.out[:size].copy_(self._run(step, span))
            finally:  # torch.cuda.graph leaves its stream current if the capture fails
                torch.cuda.set_stream(current)
        # a graph is used only if its first replay gives the step it recorded (the same kernels on the
        # same inputs: equal but for a GEMM that picks another algorithm under capture)
        graph.replay()
        tol = 1e-4 if self.model.cache.k.dtype == torch.float32 else 2e-2
        if not torch.allclose(self.out[:B], eager[:B], rtol=tol, atol=tol, equal_nan=True):
            raise RuntimeError(f"its replay differed from the eager step by up to "
                               f"{(self.out[:B] - eager[:B]).abs().max().item():.3g}")
        step.graph = graph
        self.captured += 1
        log.debug("captured a decode step: batch %d, span %d, slots per token %d", size, span,
                  0 if step.slots is None else step.slots.shape[1])

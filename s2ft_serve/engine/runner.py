"""The model runner: wraps the adapted modules, sets the per-step adapter layout, runs forward passes."""

from __future__ import annotations

import torch

from s2ft_serve.adapters.layers import AdapterBatch, pad_slots, wrap_model
from s2ft_serve.engine.graphs import DecodeGraphs, length_dependent_rotary
from s2ft_serve.model.forward import Transformer
from s2ft_serve.model.loading import target_linears


class ModelRunner:
    def __init__(self, hf_model: torch.nn.Module, max_batch_size: int, max_model_len: int, gemm: str = "exact",
                 adapter_kernel: str = "auto", cuda_graphs: bool = False):
        self.batch = AdapterBatch()
        verdicts: dict = {}  # the exact GEMMs' probe results, shared by every projection (gemm.ExactLinear)
        self.layers = wrap_model(hf_model, target_linears(hf_model), self.batch, onednn=gemm == "onednn",
                                 kernel=adapter_kernel, verdicts=verdicts)
        # one spare row for one-off scoring (`Engine.logits`) beside a full batch
        self.model = Transformer(hf_model, max_rows=max_batch_size + 1, max_len=max_model_len, gemm=gemm,
                                 verdicts=verdicts)
        self.device = self.model.device
        self.graphs = None  # decode steps as CUDA graphs (see engine.graphs), where they serve
        if cuda_graphs and self.device.type == "cuda" and not length_dependent_rotary(hf_model):
            self.graphs = DecodeGraphs(self.model, self.batch, max_batch_size)

    def _set_layout(self, slot_tuples: list[tuple[int, ...]], per_row: bool = False) -> None:
        """One tuple of slots per sequence (decode: one token each; `per_row`: a prompt each)."""
        first = slot_tuples[0]
        if all(t == first for t in slot_tuples):
            self.batch.set_single(first)
            return
        slots = torch.tensor(pad_slots(slot_tuples, max(len(t) for t in slot_tuples)), dtype=torch.int64,
                             device=self.device)  # [B, m]
        self.batch.set_rows(slots) if per_row else self.batch.set_mixed(slots)

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int], row: int, slots: tuple[int, ...], all_logits: bool) -> torch.Tensor:
        """Run one prompt into cache row `row`; logits [L or 1, vocab] float32."""
        return self.prefill_batch([prompt_ids], row, [slots], [all_logits])[0]

    @torch.inference_mode()
    def prefill_batch(self, prompts: list[list[int]], first_row: int, slot_tuples: list[tuple[int, ...]],
                      all_logits: list[bool], offsets: list[int] | None = None) -> list[torch.Tensor]:
        """Run several prompts in one pass into cache rows `first_row, first_row + 1, ...`, right-padded to
        the longest; per prompt, logits [L or 1, vocab] float32 (every position, or the last one).
        With `offsets`, prompt i continues a prefix of `offsets[i]` tokens already in its row (a later
        chunk of a chunked prefill, or the rest of a prompt after a prefix-cache hit)."""
        P, L = len(prompts), max(len(p) for p in prompts)
        offsets = offsets or [0] * P
        tokens = torch.zeros(P, L, dtype=torch.int64)
        keep, sizes = [], []
        for i, ids in enumerate(prompts):
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            start = i * L if all_logits[i] else i * L + len(ids) - 1
            keep.extend(range(start, i * L + len(ids)))
            sizes.append(i * L + len(ids) - start)
        positions = torch.tensor(offsets, dtype=torch.int64)[:, None] + torch.arange(L)[None, :]  # [P, L]
        # a shorter prompt's padding may run past the cache: it goes to the last position, which no
        # prompt token occupies (a prompt leaves room for one output) and decode overwrites first
        positions = positions.clamp(max=self.model.max_len - 1)
        self._set_layout(slot_tuples, per_row=True)
        try:
            logits = self.model(tokens.to(self.device), positions.to(self.device), slice(first_row, first_row + P),
                                cached=any(offsets), keep=torch.tensor(keep, device=self.device))
        finally:
            self.batch.set_none()
        return list(logits.split(sizes))

    @torch.inference_mode()
    def decode(self, last_tokens: list[int], positions: list[int], slot_tuples: list[tuple[int, ...]]) -> torch.Tensor:
        """One new token for each of the B running sequences (rows 0..B-1); logits [B, vocab]."""
        if self.graphs is not None:
            logits = self.graphs.decode(last_tokens, positions, slot_tuples)
            if logits is not None:
                return logits
        self._set_layout(slot_tuples)
        tokens = torch.tensor(last_tokens, dtype=torch.int64, device=self.device)[:, None]  # [B, 1]
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)[:, None]  # [B, 1]
        try:
            return self.model(tokens, pos, slice(0, len(last_tokens)), cached=True)
        finally:
            self.batch.set_none()

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.model.cache.move_row(src, dst, length)

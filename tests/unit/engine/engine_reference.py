"""Helpers for engine tests: build an engine, and a merged-weights transformers reference."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from s2ft_serve.adapters.format import merge_into
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.engine import Engine
from s2ft_serve.model.testing import device_under_test


def make_engine(path, **overrides) -> Engine:
    config = EngineConfig(**{"model": str(path), "dtype": "float32", "device": device_under_test(), **overrides})
    return Engine(config)


def reference(path, *adapters_and_weights):
    """A plain transformers model with adapters merged by W[:, index] += weight * delta."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for adapter, weight in adapters_and_weights:
        merge_into(model, adapter, weight)
    return model


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        prompt = torch.tensor([ids])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()



"""Configs whose attention or rotary angles depend on the context length: the engine serves them only
within the length where its full attention and once-per-pass rotary angles equal transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from s2ft_serve.model.testing import make_tokenizer

from engine_reference import make_engine

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, rms_norm_eps=1e-6)


def save(path, config):
    tokenizer = make_tokenizer()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CONFIGS = {
    "mistral-window": (lambda: MistralConfig(head_dim=16, sliding_window=8, **COMMON), 8, "sliding-window"),
    "qwen2-window": (lambda: Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=1, **COMMON), 8,
                     "sliding-window"),
    "llama-longrope": (lambda: LlamaConfig(head_dim=16, **COMMON, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
        "original_max_position_embeddings": 24}), 24, "LongRoPE"),
    "llama-dynamic": (lambda: LlamaConfig(head_dim=16, **{**COMMON, "max_position_embeddings": 40},
                                          rope_scaling={"rope_type": "dynamic", "factor": 2.0}), 40, "dynamic NTK"),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_the_context_stops_where_the_engine_stops_being_exact(kind, tmp_path):
    """QA: sliding windows were ignored (Mistral, window 8: every position from 8 on off by up to 2.9,
    greedy tokens changed) and LongRoPE's factors depended on the longest request in the pass."""
    make_config, limit, why = CONFIGS[kind]
    path = save(tmp_path / kind, make_config())
    engine = make_engine(path)
    assert engine.max_model_len == limit  # the default context stops there
    ids = list(range(5, 5 + limit))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits[0]
    assert (engine.logits(ids).float() - expected).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match=f"max_model_len {limit + 1} is beyond .*{why}.*at most {limit}"):
        make_engine(path, max_model_len=limit + 1)
    engine.shutdown()


def test_a_window_wider_than_the_context_changes_nothing(tmp_path):
    """Qwen2's sliding window is off unless use_sliding_window; and a window beyond the context is no limit."""
    engine = make_engine(save(tmp_path / "q", Qwen2Config(sliding_window=8, use_sliding_window=False, **COMMON)))
    assert engine.max_model_len == 512
    engine.shutdown()
    wide = save(tmp_path / "m", MistralConfig(head_dim=16, sliding_window=4096, **COMMON))
    engine = make_engine(wide)
    assert engine.max_model_len == 512
    engine.shutdown()

"""Configs whose attention or rotary angles depend on the context length: sliding-window attention is
served exactly at any length; length-dependent rotary scaling only within the length where the
engine's once-per-pass rotary angles equal transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.model.testing import make_tokenizer, random_adapter

from engine_reference import make_engine, reference, reference_greedy, reference_logits

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
    "llama-longrope": (lambda: LlamaConfig(head_dim=16, **COMMON, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
        "original_max_position_embeddings": 24}), 24, "LongRoPE"),
    "llama-dynamic": (lambda: LlamaConfig(head_dim=16, **{**COMMON, "max_position_embeddings": 40},
                                          rope_scaling={"rope_type": "dynamic", "factor": 2.0}), 40, "dynamic NTK"),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_the_context_stops_where_length_dependent_rope_would_change(kind, tmp_path):
    """QA: LongRoPE's factors depended on the longest request in the pass (a short request's logits
    moved 1.1 when batched with a long one); dynamic NTK likewise beyond max_position_embeddings."""
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


WINDOWED = {
    "mistral": lambda: MistralConfig(head_dim=16, sliding_window=8, **COMMON),
    "qwen2": lambda: Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=1, **COMMON),
    "qwen3": lambda: Qwen3Config(head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                 **COMMON),
}


@pytest.mark.parametrize("kind", sorted(WINDOWED))
def test_sliding_window_attention_matches_transformers_beyond_the_window(kind, tmp_path):
    """QA: the window was ignored (Mistral, window 8: every position from 8 on off by up to 2.9, greedy
    tokens changed). Prompts, decode steps, chunked prefill and prefix-cache hits all go past it, and
    requests of different lengths and adapters share a batch."""
    path = save(tmp_path / kind, WINDOWED[kind]())
    engine = make_engine(path, max_tokens_per_step=12, prefix_block_size=4, speculative_tokens=3).start()
    assert engine.max_model_len == 512
    adapter = random_adapter(engine.loaded.model, engine.model_name, seed=5)
    engine.add_adapter("a", adapter)
    prompts = [list(range(5, 35)), list(range(40, 51)), list(range(60, 66))]
    for name in (None, "a"):
        ref = reference(path, *([(adapter, 1.0)] if name else []))
        for ids in prompts:
            assert (engine.logits(ids, name).float() - reference_logits(ref, ids)).abs().max().item() <= 1e-4
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    for _ in range(2):  # the second time, prompts hit the prefix cache
        handles = [engine.submit(ids, name, params) for ids in prompts for name in (None, "a")]
        got = [h.result(timeout=120).token_ids for h in handles]
        want = [reference_greedy(reference(path, *([(adapter, 1.0)] if name else [])), ids, 14)
                for ids in prompts for name in (None, "a")]
        assert got == want
    engine.shutdown()


def test_a_window_off_or_wider_than_the_context_changes_nothing(tmp_path):
    engine = make_engine(save(tmp_path / "q", Qwen2Config(sliding_window=8, use_sliding_window=False, **COMMON)))
    assert engine.runner.model.windows == [None, None] and engine.max_model_len == 512
    engine.shutdown()
    wide = save(tmp_path / "m", MistralConfig(head_dim=16, sliding_window=4096, **COMMON))
    engine = make_engine(wide)  # Mistral-7B-v0.1's window: wider than any context served here
    assert engine.runner.model.windows == [4096, 4096] and engine.max_model_len == 512
    ids = list(range(5, 45))
    assert (engine.logits(ids).float() - reference_logits(reference(wide), ids)).abs().max().item() <= 1e-4
    engine.shutdown()

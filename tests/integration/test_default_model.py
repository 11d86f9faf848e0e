"""End to end on the real default model (SmolLM2-135M-Instruct): conversion, chat, exactness."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM

from s2ft_serve.adapters.format import merge_into
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.engine import Engine
from s2ft_serve.engine.request import Guide, SamplingParams
from s2ft_serve.model.testing import random_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(default_model_dir):
    e = Engine(EngineConfig(model=None, dtype="float32", device="cpu", max_batch_size=4, max_model_len=512)).start()
    yield e
    e.shutdown()


def test_default_model_shape_and_chat(engine):
    cfg = engine.loaded.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, engine.head_dim) == (30, 576, 9, 3, 1536, 64)
    ids = engine.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = engine.generate(ids, None, SamplingParams(max_tokens=24, temperature=0))
    assert "Paris" in out.text


def test_twins_on_the_default_model_answer_as_alone(engine):
    """Three copies of one chat queued together are prefilled once (one pass of one row), and each greedy
    copy answers exactly as the chat alone; a seeded sampled copy beside them answers as it does alone."""
    ids = engine.apply_chat_template([{"role": "user", "content": "Name three colours."}])
    greedy = SamplingParams(max_tokens=12, temperature=0)
    sampled = SamplingParams(max_tokens=12, temperature=0.8, seed=3)
    alone = [engine.generate(ids, None, greedy).token_ids, engine.generate(ids, None, sampled).token_ids]
    passes = []
    engine.add_step_listener(lambda rows, tokens: passes.append((rows, tokens)))
    outs = [h.result() for h in engine.submit_many([(ids, None, greedy)] * 3 + [(ids, None, sampled)])]
    assert [o.token_ids for o in outs] == [alone[0]] * 3 + [alone[1]]
    assert passes[0][0] == 1  # one row computed the prompt (after the prefix cache's hit) for all four


def test_json_schema_answer_on_the_default_model(engine):
    """The real model, asked for JSON, answers in the schema (property order included) and stops."""
    schema = {"type": "object", "additionalProperties": False, "required": ["capital", "continent"],
              "properties": {"capital": {"type": "string", "maxLength": 24},
                             "continent": {"enum": ["Africa", "Asia", "Europe", "America", "Oceania"]}}}
    ids = engine.apply_chat_template([{"role": "user", "content": "The capital of France and its continent, in JSON."}])
    out = engine.generate(ids, None, SamplingParams(max_tokens=48, temperature=0, guide=Guide(json=schema)))
    answer = json.loads(out.text)
    jsonschema.validate(answer, schema)
    assert list(answer) == ["capital", "continent"] and out.finish_reason == "stop"
    assert answer["capital"] == "Paris"


def _merged_reference(engine, default_model_dir) -> tuple[list[int], torch.Tensor, list[int]]:
    """Add a random adapter "r"; the chat prompt, the merged transformers model's logits on it and its
    12 greedy tokens."""
    adapter = random_adapter(engine.loaded.model, engine.model_name, seed=7, heads=1, channels=32, scale=0.02,
                             fingerprint=engine.fingerprint)
    engine.add_adapter("r", adapter)
    ids = engine.apply_chat_template([{"role": "user", "content": "Name three colours."}])
    ref = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    merge_into(ref, adapter)
    with torch.no_grad():
        prompt = torch.tensor([ids])  # an explicit mask: the chat template holds the pad token <|im_end|>
        greedy = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                              eos_token_id=None)[0, len(ids):].tolist()
        return ids, ref(prompt).logits[0], greedy


def test_adapter_on_default_model_matches_merged_transformers(engine, default_model_dir):
    ids, expected, greedy = _merged_reference(engine, default_model_dir)
    assert (engine.logits(ids, "r") - expected).abs().max().item() <= 1e-4
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    handles = [engine.submit(ids, a, params) for a in ["r", None, "r"]]
    outs = [h.result(timeout=120).token_ids for h in handles]
    assert outs[0] == outs[2] == greedy
    # the same prompt again reuses its cached prefix: the first token's log-probabilities stay exact
    again = engine.generate(ids, "r", SamplingParams(max_tokens=1, temperature=0, logprobs=5))
    assert again.cached_tokens >= 16 and again.token_ids == greedy[:1]
    lp = torch.log_softmax(expected[-1].float(), -1)
    assert [t for t, _ in again.logprobs[0].top] == lp.topk(5).indices.tolist()
    assert max(abs(v - lp[t].item()) for t, v in again.logprobs[0].top) <= 1e-4


def test_onednn_gemms_round_differently_but_decode_the_same(default_model_dir):
    """gemm="onednn" is outside the 1e-4 contract on a real model (rounding), yet gives the same tokens."""
    engine = Engine(EngineConfig(model=None, dtype="float32", device="cpu", max_batch_size=4, max_model_len=512,
                                 gemm="onednn")).start()
    try:
        ids, expected, greedy = _merged_reference(engine, default_model_dir)
        assert (engine.logits(ids, "r") - expected).abs().max().item() <= 1e-3
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        assert engine.generate(ids, "r", params).token_ids == greedy
    finally:
        engine.shutdown()

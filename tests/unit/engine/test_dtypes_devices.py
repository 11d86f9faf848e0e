"""bfloat16 / float16 serving stays close to float32; the CUDA path (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from s2ft_serve.model.testing import random_adapter

from engine_reference import make_engine, reference, reference_logits


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_tracks_float32(tiny_llama_dir, dtype):
    engine = make_engine(tiny_llama_dir, dtype=dtype)
    assert engine.dtype == getattr(torch, dtype)
    adapter = random_adapter(engine.loaded.model, engine.model_name, seed=2)
    engine.add_adapter("a", adapter)
    ids = engine.tokenize("Hello world! The quick")
    expected = reference_logits(reference(tiny_llama_dir, (adapter, 1.0)), ids)
    got = engine.logits(ids, "a")
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 0.1 * expected.abs().max().item()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_mixed_batch_matches_reference(tiny_llama_dir, dtype):
    from s2ft_serve.engine.request import SamplingParams

    engine = make_engine(tiny_llama_dir, device="cuda", dtype=dtype).start()
    adapter = random_adapter(engine.loaded.model, engine.model_name, seed=2)
    engine.add_adapter("a", adapter)
    ids = engine.tokenize("Hello world! The quick")
    expected = reference_logits(reference(tiny_llama_dir, (adapter, 1.0)), ids)
    tol = 1e-4 if dtype == "float32" else 0.1 * expected.abs().max().item()
    assert (engine.logits(ids, "a").cpu() - expected).abs().max().item() <= tol
    outs = [h.result(timeout=60) for h in
            [engine.submit(ids, a, SamplingParams(max_tokens=5, temperature=0)) for a in ["a", None, "a"]]]
    assert outs[0].token_ids == outs[2].token_ids
    engine.shutdown()

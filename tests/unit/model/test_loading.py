"""Model loading: local folders, refusal of unsupported models, the fingerprint."""

from __future__ import annotations

import pytest
import torch

from s2ft_serve.errors import ModelNotSupportedError
from s2ft_serve.model.loading import cache_dir, fingerprint, load_model, resolve_model_path, target_linears


def test_loads_a_local_folder_with_targets(tiny_qwen2_dir):
    loaded = load_model(tiny_qwen2_dir, dtype="bfloat16")
    assert loaded.model.dtype == torch.bfloat16 and loaded.name == str(tiny_qwen2_dir)
    names = sorted(target_linears(loaded.model))
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj",
                     "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]


def test_fingerprint_ignores_the_serving_dtype_but_not_the_weights(tiny_llama_dir):
    fp32, bf16 = load_model(tiny_llama_dir, "float32"), load_model(tiny_llama_dir, "bfloat16")
    assert fp32.fingerprint == bf16.fingerprint
    with torch.no_grad():
        fp32.model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
    assert fingerprint(fp32.model) != bf16.fingerprint


def test_unsupported_models_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelNotSupportedError, match="model type 'gpt2' is not supported"):
        load_model(tmp_path / "gpt2")
    with pytest.raises(ModelNotSupportedError, match="not a local Hugging Face model folder"):
        resolve_model_path(tmp_path / "missing")
    with pytest.raises(ModelNotSupportedError, match="never downloaded"):
        resolve_model_path("meta-llama/Llama-3.1-8B")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("S2FT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_a_model_folder_with_only_pickle_weights_is_refused_unread(tiny_llama_dir, tmp_path, monkeypatch):
    """QA: a base folder holding only pytorch_model.bin was loaded (torch.load) by the engine, the
    trainer and s2ft-adapter, though pickle is never loaded; it is refused, naming the file and the
    conversion, without reading it."""
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, pickled)
    state = load_model(str(tiny_llama_dir), dtype=None).model.state_dict()
    torch.save(state, pickled / "pytorch_model.bin")
    for file in pickled.glob("*.safetensors*"):
        file.unlink()
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {})
    with pytest.raises(ModelNotSupportedError, match="only pickle weights \\(pytorch_model.bin\\)"):
        load_model(str(pickled))
    assert loads == []

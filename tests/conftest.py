"""Shared fixtures: tiny random models (2 layers, hidden 64) built offline, and the real default model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from s2ft_serve.model.testing import make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=1)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model_dir(request, tiny_llama_dir, tiny_qwen2_dir):
    """Each test using this runs on both a tiny Llama and a tiny Qwen2."""
    return tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir


@pytest.fixture(scope="session")
def default_model_dir():
    """The real SmolLM2-135M-Instruct, converted once into the cache."""
    from s2ft_serve.model.loading import default_model_dir as resolve

    return resolve()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

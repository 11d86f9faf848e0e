"""Helpers for the server tests: an engine over a tiny model, adapter folders, an in-process client."""

from __future__ import annotations

import httpx

from s2ft_serve.adapters.format import save_adapter
from s2ft_serve.config import EngineConfig
from s2ft_serve.engine.engine import Engine
from s2ft_serve.model.testing import random_adapter


def make_server_engine(model_dir, root, **overrides) -> Engine:
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", adapter_root=str(root),
                          **{"max_batch_size": 8, **overrides})
    return Engine(config).start()


def write_adapter(engine: Engine, folder, seed: int):
    return save_adapter(random_adapter(engine.loaded.model, engine.model_name, seed=seed, channels=8), folder)


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000", timeout=60)

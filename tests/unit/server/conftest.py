"""Server fixtures: one engine over the tiny Llama (shared by the module), an adapter root with two
adapters on disk, and an httpx client talking to `create_app` in-process (ASGI transport)."""

from __future__ import annotations

import pytest
from server_helpers import client_for, make_server_engine, write_adapter

from s2ft_serve.server.app import create_app
from s2ft_serve.server.settings import ServerSettings

DISK_ADAPTERS = {"a0": 10, "a1": 11}  # name -> seed, written under the adapter root


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    return tmp_path_factory.mktemp("adapter-root")


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, adapter_root):
    e = make_server_engine(tiny_llama_dir, adapter_root)
    for name, seed in DISK_ADAPTERS.items():
        write_adapter(e, adapter_root / name, seed)
        e.load_adapter(name, str(adapter_root / name))
    yield e
    e.shutdown(timeout=5)


@pytest.fixture
def settings(tiny_llama_dir, adapter_root) -> ServerSettings:
    return ServerSettings(model=str(tiny_llama_dir), adapter_root=str(adapter_root), dtype="float32", device="cpu")


@pytest.fixture
async def client(settings, engine):
    async with client_for(create_app(settings, engine)) as c:
        yield c

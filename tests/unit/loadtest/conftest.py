"""Fixtures of the load tester's tests: a fake OpenAI-compatible server on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from fake_openai import FakeState, make_app


@pytest.fixture
def fake_server():
    """(url, state) of a fake server running in a thread on a free loopback port."""
    import uvicorn

    state = FakeState()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake server did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=10)

"""Carry one HTTP request across Ray and run it through an ASGI app in process.

The ingress turns the incoming request into a `ForwardedRequest` (plain data, cheap to send); the
replica calls its s2ft-serve app with it and yields a `ResponseStart` followed by body chunks, so
server-sent events stream through Ray's streaming handles as they are produced.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

APP_EXIT_TIMEOUT_S = 5.0  # after the response (or a disconnect), how long the app may take to return
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


@dataclass
class ForwardedRequest:
    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # lower-case names, as ASGI has them
    body: bytes = b""
    client: tuple[str, int] | None = None


@dataclass
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == key), None)


def error_start(status: int, message: str, error_type: str) -> tuple[ResponseStart, bytes]:
    """A response in OpenAI's error shape, for failures outside the app (a dead replica)."""
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": None}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return ResponseStart(status, headers), body


def _scope(req: ForwardedRequest) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
        "query_string": req.query, "root_path": "", "headers": list(req.headers),
        "client": req.client, "server": ("s2ft-replica", 80), "state": {},
    }


async def call_app(app: ASGIApp, req: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
    """Run `req` through `app`; yield the response start, then each non-empty body chunk.

    Closing the iterator early (the client went away) disconnects the request inside the app, so
    the app cancels its engine requests just as it would for a real socket.
    """
    messages: asyncio.Queue[dict | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    pending_body = [req.body]

    async def receive() -> dict:
        if pending_body:
            return {"type": "http.request", "body": pending_body.pop(), "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(_scope(req), receive, messages.put)
        finally:
            await messages.put(None)

    task = asyncio.ensure_future(run())
    started = False
    try:
        while True:
            message = await messages.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                started = True
                yield ResponseStart(message["status"], [tuple(h) for h in message.get("headers", [])])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        if not started:
            start, body = error_start(500, "the replica's app ended without a response", "internal_error")
            yield start
            yield body
    finally:
        disconnected.set()  # the app's own disconnect handling cancels its engine requests
        try:
            await asyncio.wait_for(asyncio.shield(task), APP_EXIT_TIMEOUT_S)
        except BaseException:  # noqa: BLE001 - the app's own failure was already answered as a 500
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

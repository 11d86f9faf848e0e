"""A fake OpenAI-compatible server app, for the load tester's own tests.

It answers deterministically: the text of a completion names the adapter's current folder and
the prompt, so chaos mode's solo re-sends can be checked exactly. `FakeState` lets a test make it
refuse with 429 or answer differently inside a batch on purpose.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

BASE = "fake-base"


@dataclass
class FakeState:
    adapters: dict[str, str] = field(default_factory=dict)  # name -> path
    fused: set[str] = field(default_factory=set)
    max_in_flight: int = 1000  # beyond this, answer 429
    corrupt_when_batched: bool = False  # the bug chaos mode must catch: answers depend on the batch
    answer_nothing: bool = False  # every answer empty: a comparison of them could not fail
    piece_delay_s: float = 0.0  # between streamed pieces: a slow stream
    drop_done: bool = False  # streams end without data: [DONE] (a server that closed early)
    in_flight: int = 0
    bodies: list[dict] = field(default_factory=list)
    seen: dict[str, list[list[str]]] = field(default_factory=dict)  # model -> earlier prompts, as words


def _cached_words(earlier: list[list[str]], words: list[str]) -> int:
    """A prefix cache in words: the longest start `words` shares with an earlier prompt."""
    best = 0
    for old in earlier:
        n = 0
        while n < min(len(old), len(words)) and old[n] == words[n]:
            n += 1
        best = max(best, n)
    return best


def _tokens(model: str, path: str, prompt: str, n: int) -> list[str]:
    seed = zlib.crc32(f"{model}|{path}|{prompt}".encode())
    return [f" w{(seed >> (i % 16)) % 97}" for i in range(n)]


def make_app(state: FakeState):
    app = FastAPI()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "x", "param": None, "code": None}}, status)

    @app.get("/v1/models")
    async def models():
        data = [{"id": BASE, "object": "model"}] + [{"id": n, "parent": BASE} for n in sorted(state.adapters)]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse("# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes 1.048576e+08\n")

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        body = await request.json()
        state.bodies.append(body)
        model = body["model"]
        if model != BASE and model not in state.adapters:
            return error(404, f"The model '{model}' does not exist.")
        if state.in_flight >= state.max_in_flight:
            return error(429, "queue full")
        path = state.adapters.get(model, "")
        prompt = body.get("prompt") or body["messages"][-1]["content"]
        pieces = [] if state.answer_nothing else _tokens(model, path, prompt, body["max_tokens"])
        earlier = state.seen.setdefault(model, [])
        cached = _cached_words(earlier, prompt.split())
        earlier.append(prompt.split())
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(pieces),
                 "prompt_tokens_details": {"cached_tokens": cached}}
        state.in_flight += 1
        try:
            await asyncio.sleep(0.002)
            if state.corrupt_when_batched and state.in_flight > 1:
                pieces[-1] = " corrupted"
        finally:
            state.in_flight -= 1
        chat = "messages" in body
        if not body.get("stream"):
            choice = {"message": {"role": "assistant", "content": "".join(pieces)}} if chat else {"text": "".join(pieces)}
            return {"model": model, "choices": [choice], "usage": usage}

        async def chunks():
            if chat:  # the opening chunk, then deltas that write the unset role as null (as some servers do)
                yield f"data: {json.dumps({'choices': [{'delta': {'role': 'assistant', 'content': ''}}]})}\n\n"
            for piece in pieces:
                await asyncio.sleep(state.piece_delay_s)
                choice = {"delta": {"role": None, "content": piece}} if chat else {"text": piece}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            if not state.drop_done:
                yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/v1/adapters")
    async def load(request: Request):
        body = await request.json()
        name, path = body["name"], body["path"]
        if name in state.adapters and not body.get("replace"):
            return error(409, f"adapter {name} is already loaded")
        state.adapters[name] = path
        return {"name": name}

    @app.post("/v1/load_lora_adapter")
    async def load_vllm(request: Request):
        body = await request.json()
        state.adapters[body["lora_name"]] = body["lora_path"]
        return "ok"

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        if state.adapters.pop(name, None) is None:
            return error(404, f"The model '{name}' does not exist.")
        return {"name": name}

    @app.post("/v1/adapters/{name}/{op}")
    async def fuse(name: str, op: str):
        if name not in state.adapters:
            return error(404, f"The model '{name}' does not exist.")
        (state.fused.add if op == "fuse" else state.fused.discard)(name)
        return {"name": name, "fused": name in state.fused}

    return app

"""Admin API: load/list/describe/unload, fuse/unfuse, merge, vLLM aliases, the adapter-root rule, /v1/models."""

from __future__ import annotations

import os
from urllib.parse import quote

from server_helpers import write_adapter

from s2ft_serve.engine.request import SamplingParams


async def completion_text(client, model: str) -> str:
    r = await client.post("/v1/completions", json={"prompt": "Hello", "model": model, "max_tokens": 8,
                                                   "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


async def test_load_describe_list_and_delete(client, engine, adapter_root):
    write_adapter(engine, adapter_root / "admin-x-dir", seed=21)  # not the name: no lazy reload after delete
    r = await client.post("/v1/adapters", json={"name": "admin-x", "path": "admin-x-dir"})
    assert r.status_code == 201, r.text
    card = r.json()
    assert card["id"] == "admin-x" and card["path"] == str((adapter_root / "admin-x-dir").resolve())
    assert card["modules"] > 0 and card["parameters"] > 0 and card["nbytes"] > 0 and card["fused"] is False
    assert card["per_layer"] and card["config"]["adapter_type"] == "s2ft"
    listed = (await client.get("/v1/adapters")).json()["data"]
    assert "admin-x" in {a["id"] for a in listed}
    await completion_text(client, "admin-x")
    assert (await client.get("/v1/adapters/admin-x")).json()["requests_served"] >= 1
    models = (await client.get("/v1/models")).json()["data"]
    assert models[0]["id"] == engine.model_name and models[0]["parent"] is None
    assert {m["id"]: m["parent"] for m in models[1:]}["admin-x"] == engine.model_name
    assert "/" in engine.model_name  # a folder's path: QA found GET /v1/models/{id} a 404 for it
    for model in models:  # every id listed can be retrieved, as the openai client's models.retrieve does
        for spelled in (model["id"], quote(model["id"], safe="")):
            got = await client.get(f"/v1/models/{spelled}")
            assert got.status_code == 200 and got.json()["id"] == model["id"], spelled
    r = await client.delete("/v1/adapters/admin-x")
    assert r.status_code == 200 and r.json() == {"id": "admin-x", "object": "adapter", "deleted": True}
    r = await client.post("/v1/completions", json={"prompt": "Hello", "model": "admin-x"})
    assert r.status_code == 404
    assert (await client.delete("/v1/adapters/admin-x")).status_code == 404


async def test_replace_serves_new_weights(client, engine, adapter_root):
    write_adapter(engine, adapter_root / "swap-old", seed=31)
    write_adapter(engine, adapter_root / "swap-new", seed=32)
    assert (await client.post("/v1/adapters", json={"name": "swap", "path": "swap-old"})).status_code == 201
    old = await completion_text(client, "swap")
    assert (await client.post("/v1/adapters", json={"name": "swap", "path": "swap-new"})).status_code == 409
    r = await client.post("/v1/adapters", json={"name": "swap", "path": "swap-new", "replace": True})
    assert r.status_code == 201
    new = await completion_text(client, "swap")
    expected = engine.generate("Hello", "swap", SamplingParams(max_tokens=8, temperature=0)).text
    assert new == expected and new != old


async def test_paths_outside_the_root_are_403(client, engine, adapter_root, tmp_path):
    outside = write_adapter(engine, tmp_path / "outside", seed=41)
    for path in (str(outside), "../outside", "/etc"):
        r = await client.post("/v1/adapters", json={"name": "evil", "path": path})
        assert r.status_code == 403, r.text
        assert r.json()["error"]["type"] == "permission_error"
    link = adapter_root / "sneaky-link"
    if not link.exists():
        os.symlink(outside, link)
    assert (await client.post("/v1/adapters", json={"name": "evil", "path": "sneaky-link"})).status_code == 403
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(outside)})
    assert r.status_code == 403


async def test_vllm_aliases(client, engine, adapter_root):
    write_adapter(engine, adapter_root / "vllm-dir", seed=51)
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": "vllm-a", "lora_path": "vllm-dir"})
    assert r.status_code == 200 and "vllm-a" in r.text
    assert (await client.post("/v1/load_lora_adapter",
                              json={"lora_name": "vllm-a", "lora_path": "vllm-dir"})).status_code == 409
    r = await client.post("/v1/load_lora_adapter",
                          json={"lora_name": "vllm-a", "lora_path": "vllm-dir", "load_inplace": True})
    assert r.status_code == 200
    await completion_text(client, "vllm-a")
    assert (await client.post("/v1/unload_lora_adapter", json={"lora_name": "vllm-a"})).status_code == 200
    assert (await client.post("/v1/unload_lora_adapter", json={"lora_name": "vllm-a"})).status_code == 404


async def test_fuse_unfuse_keep_outputs(client, engine):
    before = {m: await completion_text(client, m) for m in ("a0", "a1", engine.model_name)}
    r = await client.post("/v1/adapters/a0/fuse")
    assert r.status_code == 200 and r.json()["fused"] is True
    try:
        metrics = (await client.get("/metrics")).text
        assert "s2ft_fused_adapters 1.0" in metrics
        assert "s2ft_auto_fuse_decisions_total 0.0" in metrics
        during = {m: await completion_text(client, m) for m in before}
        assert during == before
    finally:
        r = await client.post("/v1/adapters/a0/unfuse")
    assert r.status_code == 200 and r.json()["fused"] is False
    assert {m: await completion_text(client, m) for m in before} == before
    assert (await client.post("/v1/adapters/nope/fuse")).status_code == 404
    await client.post("/v1/adapters/a0/fuse")
    try:  # QA: with one fused, an unknown name was "already fused" (409)
        assert (await client.post("/v1/adapters/nope/fuse")).status_code == 404
    finally:
        await client.post("/v1/adapters/a0/unfuse")


async def test_merge_route_makes_a_usable_adapter(client, engine):
    body = {"name": "merged", "sources": [{"name": "a0", "weight": 0.5}, {"name": "a1", "weight": 0.5}]}
    r = await client.post("/v1/adapters/merge", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["config"]["merged_from"] == body["sources"]
    text = await completion_text(client, "merged")
    assert text == engine.generate("Hello", "merged", SamplingParams(max_tokens=8, temperature=0)).text
    assert (await client.post("/v1/adapters/merge", json=body)).status_code == 409
    missing = {"name": "m2", "sources": [{"name": "nope", "weight": 1.0}]}
    assert (await client.post("/v1/adapters/merge", json=missing)).status_code == 404
    assert (await client.delete("/v1/adapters/merged")).status_code == 200


async def test_lazy_load_from_the_root(client, engine, adapter_root):
    write_adapter(engine, adapter_root / "lazy-one", seed=61)
    assert not engine.has_adapter("lazy-one")
    text = await completion_text(client, "lazy-one")
    assert engine.has_adapter("lazy-one")
    assert text == engine.generate("Hello", "lazy-one", SamplingParams(max_tokens=8, temperature=0)).text


async def test_unusable_paths_are_400_not_500(client):
    for path in ("a0\x00evil", "~nosuchuser/x"):
        r = await client.post("/v1/adapters", json={"name": "weird", "path": path})
        assert r.status_code in (400, 403), r.text


async def test_admin_actions_on_the_base_models_name_say_so(client, engine, monkeypatch):
    """Unloading, fusing or unfusing the base model by its name is a 400 that says it is the base model,
    not a 404 claiming it does not exist. (The tiny model's name is its folder's path, which no route
    takes; the default model's is "SmolLM2-135M-Instruct": this one is named so.)"""
    monkeypatch.setattr(engine, "model_name", "tiny-base")
    for r in (await client.delete("/v1/adapters/tiny-base"), await client.post("/v1/adapters/tiny-base/fuse"),
              await client.post("/v1/adapters/tiny-base/unfuse"),
              await client.post("/v1/unload_lora_adapter", json={"lora_name": "tiny-base"})):
        assert r.status_code == 400 and "is the base model, not an adapter" in r.json()["error"]["message"], r.text
    assert "tiny-base" in [m["id"] for m in (await client.get("/v1/models")).json()["data"]]

"""Auth: API key on every /v1 route, admin key on admin routes, admin closed off loopback without a key."""

from __future__ import annotations

from server_helpers import client_for

from s2ft_serve.server.app import create_app

COMPLETION = {"prompt": "hi", "max_tokens": 1}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def test_api_key_guards_v1_routes_only(settings, engine):
    app = create_app(settings.model_copy(update={"api_key": "sk-user"}), engine)
    async with client_for(app) as c:
        for headers in ({}, bearer("wrong"), {"Authorization": "sk-user"}):
            r = await c.post("/v1/completions", json=COMPLETION, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert (await c.get("/v1/models")).status_code == 401
        assert (await c.post("/tokenize", json={"prompt": "x"})).status_code == 401
        assert (await c.post("/tokenize", json={"prompt": "x"}, headers=bearer("sk-user"))).status_code == 200
        assert (await c.post("/v1/completions", json=COMPLETION, headers=bearer("sk-user"))).status_code == 200
        assert (await c.get("/v1/models", headers=bearer("sk-user"))).status_code == 200
        for path in ("/health", "/ready", "/metrics"):
            assert (await c.get(path)).status_code == 200


async def test_admin_key_needed_for_admin_routes(settings, engine):
    app = create_app(settings.model_copy(update={"api_key": "sk-user", "admin_key": "sk-admin"}), engine)
    async with client_for(app) as c:
        assert (await c.get("/v1/adapters")).status_code == 401
        r = await c.get("/v1/adapters", headers=bearer("sk-user"))
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert (await c.get("/v1/adapters", headers=bearer("sk-admin"))).status_code == 200
        # the admin key also works on the user routes
        assert (await c.post("/v1/completions", json=COMPLETION, headers=bearer("sk-admin"))).status_code == 200


async def test_admin_routes_closed_off_loopback_without_admin_key(settings, engine):
    app = create_app(settings.model_copy(update={"host": "0.0.0.0"}), engine)
    async with client_for(app) as c:
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "a0"})
        assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
        assert (await c.get("/v1/adapters")).status_code == 403
        assert (await c.post("/v1/completions", json=COMPLETION)).status_code == 200


async def test_admin_open_on_loopback_without_keys(client):
    assert (await client.get("/v1/adapters")).status_code == 200


async def test_keyless_admin_routes_refuse_web_pages_and_other_host_names(client):
    """QA: with no admin key (loopback), another site's page fused, unfused and reset the prefix cache
    with a plain form POST, and through DNS rebinding (its own host name pointing at 127.0.0.1) loaded
    adapters from any folder."""
    for headers, code in (({"Origin": "http://evil.example"}, "foreign_origin"), ({"Origin": "null"}, "foreign_origin"),
                          ({"Host": "attacker.example:8000"}, "foreign_host"),
                          ({"Host": "attacker.example", "Origin": "http://attacker.example"}, "foreign_host"),
                          ({"Host": "["}, "foreign_host"), ({"Origin": "http://["}, "foreign_origin")):  # not a 500
        for method, path in (("post", "/v1/adapters/a0/fuse"), ("post", "/reset_prefix_cache"), ("get", "/v1/adapters")):
            r = await getattr(client, method)(path, headers={"Content-Type": "text/plain", **headers})
            assert r.status_code == 403 and r.json()["error"]["code"] == code, (headers, path, r.text)
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):  # programs on this machine, pages it serves itself
        r = await client.get("/v1/adapters", headers={"Host": host, "Origin": f"http://{host}"})
        assert r.status_code == 200, host
    # user routes are unaffected (a page may call a keyless inference API, as with any local server)
    r = await client.post("/v1/completions", json=COMPLETION, headers={"Origin": "http://evil.example"})
    assert r.status_code == 200


async def test_a_non_ascii_key_matches_what_a_utf8_client_sends(settings, engine):
    """QA: a key such as "clé" matched only Latin-1 bytes (curl from a UTF-8 shell got 401), and a key holding
    bytes that are not UTF-8 made every bearer request a 500: refused at start now."""
    import pytest
    from pydantic import ValidationError

    app = create_app(settings.model_copy(update={"api_key": "clé"}), engine)
    async with client_for(app) as c:
        ok = await c.post("/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer clé".encode()})
        assert ok.status_code == 200
        wrong = await c.post("/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer cle".encode()})
        assert wrong.status_code == 401
    with pytest.raises(ValidationError, match="api_key is not valid UTF-8"):
        type(settings)(api_key="sk-\udcff")

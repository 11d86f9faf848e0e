"""The Ray Serve fleet (deploy/ray): a local 2-replica deployment of tiny models.

Adapter-affinity routing (checked through the `x-replica-id` header), greedy outputs equal to the
single-process server's, admin changes reaching every replica that holds the adapter, and a
replica killed mid-traffic replaced while requests keep succeeding.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from s2ft_serve.adapters.format import save_adapter  # noqa: E402
from s2ft_serve.engine.engine import Engine  # noqa: E402
from s2ft_serve.model.loading import load_model  # noqa: E402
from s2ft_serve.model.testing import random_adapter  # noqa: E402
from s2ft_serve.server.app import create_app  # noqa: E402
from s2ft_serve.server.settings import ServerSettings  # noqa: E402

pytestmark = pytest.mark.ray

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "ray"
APP_NAME = "s2ft-test"
ADAPTERS = ("a0", "a1", "a2", "a3")
PROMPT = "the quick brown fox"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapter_root(tiny_llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fleet-adapters")
    loaded = load_model(str(tiny_llama_dir))
    for seed, name in enumerate(ADAPTERS):
        adapter = random_adapter(loaded.model, loaded.name, seed=seed + 10, heads=2, channels=16, scale=0.5)
        save_adapter(adapter, root / name)
    return root


@pytest.fixture(scope="module")
def fleet(tiny_llama_dir, adapter_root):
    """A 2-replica deployment on a local Ray with 2 CPUs; yields its base URL."""
    if str(DEPLOY_DIR) not in sys.path:
        sys.path.insert(0, str(DEPLOY_DIR))
    from s2ft_ray.app import bind_app

    python_path = os.pathsep.join([str(DEPLOY_DIR), os.environ.get("PYTHONPATH", "")])
    env = {"PYTHONPATH": python_path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, logging_level="warning")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": str(tiny_llama_dir), "adapter_root": str(adapter_root), "max_adapters_per_replica": 2,
            "adapter": [f"preloaded={adapter_root / 'a1'}"],
            "poll_interval_s": 1.0, "replica_liveness_s": 4.0, "admin_ack_timeout_s": 20.0}
    # One request at a time per replica makes concurrent requests spread over both replicas.
    app = bind_app(args, replica_options={"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 1,
                                           "health_check_period_s": 1},
                    ingress_options={"ray_actor_options": {"num_cpus": 0.25}})
    serve.run(app, name=APP_NAME, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, adapter_root):
    """The single-process server on the same model and adapters (in process, through httpx)."""
    settings = ServerSettings(model=str(tiny_llama_dir), adapter_root=str(adapter_root))
    engine = Engine(settings.engine_config()).start()
    client = httpx.Client(transport=httpx.ASGITransport(app=create_app(settings, engine)), base_url="http://ref")
    yield client
    engine.shutdown(timeout=5)


def complete(client: httpx.Client, model: str | None = None, **extra) -> httpx.Response:
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, **extra}
    if model is not None:
        body["model"] = model
    return client.post("/v1/completions", json=body, timeout=60)


async def acomplete(client: httpx.AsyncClient, model: str | None, **extra) -> httpx.Response:
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, **extra}
    if model is not None:
        body["model"] = model
    return await client.post("/v1/completions", json=body, timeout=60)


def reference_text(reference, model: str | None) -> str:
    # the in-process ASGI transport needs an event loop: run the async client
    async def go() -> str:
        async with httpx.AsyncClient(transport=reference._transport, base_url="http://ref") as client:
            response = await acomplete(client, model)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

    return asyncio.run(go())


def fleet_view(client: httpx.Client) -> dict:
    response = client.get("/fleet")
    assert response.status_code == 200, response.text
    return response.json()


def wait_until(predicate, timeout: float = 30.0, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def test_same_adapter_lands_on_the_replica_holding_it_and_matches_single_process(fleet, reference):
    with httpx.Client(base_url=fleet) as client:
        first = complete(client, "a0")
        assert first.status_code == 200, first.text
        holder = first.headers["x-replica-id"]
        assert first.headers["x-adapter-id"] == "a0"
        time.sleep(1.5)  # the replica's adapter list reaches the routers (pushed every 0.1 s)
        landed = {complete(client, "a0").headers["x-replica-id"] for _ in range(6)}
        assert landed == {holder}
        other = complete(client, "a1")  # the other replica holds fewer adapters: a1 goes there
        assert other.status_code == 200
        time.sleep(1.5)
        assert {complete(client, "a1").headers["x-replica-id"] for _ in range(4)} == {other.headers["x-replica-id"]}
        assert other.headers["x-replica-id"] != holder

        for model in (None, "a0", "a1", "a2"):
            got = complete(client, model)
            assert got.status_code == 200, got.text
            assert got.json()["choices"][0]["text"] == reference_text(reference, model), model
        assert complete(client, adapter="a0").json()["choices"][0]["text"] == reference_text(reference, "a0")
        preloaded = complete(client, "preloaded")  # `--adapter NAME=PATH`: a catalog record any replica loads
        assert preloaded.status_code == 200, preloaded.text
        assert preloaded.json()["choices"][0]["text"] == reference_text(reference, "a1")
        missing = complete(client, "nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "The model 'nope' does not exist."


def test_reads_about_an_adapter_reach_a_replica_that_has_it_and_load_nothing(fleet, adapter_root):
    """QA: `GET /v1/models/{name}` and `/tokenize` went to any replica (200 or 404 by chance, always 404
    for a preloaded adapter no replica held yet), and `GET /v1/adapters/{name}` loaded the adapter."""
    with httpx.Client(base_url=fleet) as client:
        for _ in range(6):  # `preloaded` is a catalog record: any replica can answer for it
            card = client.get("/v1/models/preloaded")
            assert card.status_code == 200, card.text
            assert card.json()["id"] == "preloaded"
            tokens = client.post("/tokenize", json={"model": "preloaded", "prompt": "hello"})
            assert tokens.status_code == 200, tokens.text
        shutil.copytree(adapter_root / "a0", adapter_root / "unread")  # loadable by name, loaded nowhere
        for _ in range(3):
            assert client.get("/v1/adapters/unread").status_code == 404
            assert client.get("/v1/models/unread").status_code == 404
            assert client.post("/tokenize", json={"model": "unread", "prompt": "hi"}).status_code == 200
        assert client.get("/v1/models/nope").status_code == 404
        assert client.post("/tokenize", json={"model": "nope", "prompt": "hi"}).status_code == 404
        time.sleep(1.0)
        assert not any("unread" in r["held"] for r in fleet_view(client)["replicas"].values())


def test_streaming_passes_through_the_fleet(fleet, reference):
    with httpx.Client(base_url=fleet) as client:
        with client.stream("POST", "/v1/completions", json={
                "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "model": "a1", "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["x-replica-id"]
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1] if json.loads(line[6:])["choices"])
    assert text == reference_text(reference, "a1")


def test_each_replica_holds_a_bounded_number_of_adapters(fleet):
    with httpx.Client(base_url=fleet) as client:
        for name in ADAPTERS:
            assert complete(client, name).status_code == 200
        time.sleep(1.5)
        view = fleet_view(client)
    live = [r for r in view["replicas"].values() if r["live"]]
    assert len(live) == 2
    assert all(len(r["held"]) <= 2 for r in live), view


def test_admin_replace_and_unload_reach_every_replica_holding_the_adapter(fleet, reference, adapter_root):
    async def spread(name: str) -> set[str]:
        """Concurrent requests: a busy replica (one request at a time) sends the next one elsewhere."""
        async with httpx.AsyncClient(base_url=fleet) as client:
            responses = await asyncio.gather(*(acomplete(client, name, max_tokens=48) for _ in range(4)))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return {r.headers["x-replica-id"] for r in responses}

    with httpx.Client(base_url=fleet) as client:
        loaded = client.post("/v1/adapters", json={"name": "shared", "path": str(adapter_root / "a2")})
        assert loaded.status_code == 201, loaded.text
        again = client.post("/v1/adapters", json={"name": "shared", "path": str(adapter_root / "a2")})
        assert again.status_code == 409

        def held_everywhere() -> bool:
            asyncio.run(spread("shared"))
            time.sleep(0.5)  # replicas report what they hold after each load
            live = [r for r in fleet_view(client)["replicas"].values() if r["live"]]
            return len(live) == 2 and all("shared" in r["held"] for r in live)

        wait_until(held_everywhere, timeout=60, step=0.1)

        replaced = client.post("/v1/adapters", json={"name": "shared", "path": str(adapter_root / "a3"),
                                                     "replace": True})
        assert replaced.status_code == 201, replaced.text
        assert "x-fleet-lagging" not in replaced.headers
        expected = reference_text(reference, "a3")
        for _ in range(3):  # whichever replica answers, it has the new weights
            outputs = asyncio.run(_texts(fleet, "shared"))
            assert set(outputs) == {expected}

        fused = client.post("/v1/adapters/shared/fuse")
        assert fused.status_code == 200, fused.text
        assert fused.json()["fused"] is True and "x-fleet-lagging" not in fused.headers
        view = fleet_view(client)
        assert view["records"]["shared"]["fused"] is True
        wait_until(lambda: all("shared" in r["fused"] for r in fleet_view(client)["replicas"].values() if r["live"]),
                   timeout=10)
        assert set(asyncio.run(_texts(fleet, "shared"))) == {expected}  # fused or not, the same greedy text
        unfused = client.post("/v1/adapters/shared/unfuse")
        assert unfused.status_code == 200, unfused.text
        wait_until(lambda: not any(r["fused"] for r in fleet_view(client)["replicas"].values() if r["live"]),
                   timeout=10)

        removed = client.delete("/v1/adapters/shared")
        assert removed.status_code == 200, removed.text
        view = fleet_view(client)
        assert "shared" not in view["records"]
        assert all("shared" not in r["held"] for r in view["replicas"].values() if r["live"])
        assert complete(client, "shared").status_code == 404


async def _texts(url: str, name: str) -> list[str]:
    async with httpx.AsyncClient(base_url=url) as client:
        responses = await asyncio.gather(*(acomplete(client, name) for _ in range(4)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json()["choices"][0]["text"] for r in responses]


def test_config_files_are_valid_serve_configs():
    """serve_config.yaml and the RayService's serveConfigV2 pass Ray's schema and bind an application."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    if str(DEPLOY_DIR) not in sys.path:
        sys.path.insert(0, str(DEPLOY_DIR))
    from s2ft_ray.options import split_args

    try:  # what `serve run` / `serve deploy` call; it insists on a one-argument builder
        from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as call_builder
    except ImportError:  # another Ray version: call the builder as Ray documents it
        def call_builder(builder, args):
            return builder(args)
    import app as entry  # deploy/ray/app.py, as `import_path: app:build_app` finds it

    local = yaml.safe_load((DEPLOY_DIR / "serve_config.yaml").read_text())
    service = list(yaml.safe_load_all((DEPLOY_DIR / "rayservice.yaml").read_text()))[-1]
    for config in (local, yaml.safe_load(service["spec"]["serveConfigV2"])):
        schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
            else ServeDeploySchema.parse_obj(config)
        app = schema.applications[0]
        assert app.import_path == "app:build_app"
        assert {d.name for d in app.deployments} == {"EngineReplica", "FleetIngress", "AdapterCatalog"}
        settings, fleet = split_args(app.args)
        assert settings.adapter_root == "/mnt/adapters" and fleet.max_adapters_per_replica == 8
        assert call_builder(entry.build_app, app.args) is not None
    with pytest.raises(Exception, match="unknown application argument"):
        split_args({"adpater_root": "/x"})


def test_routing_reads_the_adapter_and_the_admin_change_like_the_server():
    if str(DEPLOY_DIR) not in sys.path:
        sys.path.insert(0, str(DEPLOY_DIR))
    from s2ft_ray.routing import route

    base = {"base-model"}

    def body(**fields) -> bytes:
        return json.dumps(fields).encode()

    assert route("POST", "/v1/completions", body(model="x"), base).adapter == "x"
    assert route("POST", "/v1/chat/completions", body(model="base-model", adapter="y"), base).adapter == "y"
    assert route("POST", "/v1/completions", body(model="base-model"), base).adapter is None
    assert route("POST", "/v1/completions", body(adapter="base-model"), base).adapter is None
    assert route("POST", "/v1/completions", b"not json", base).adapter is None  # the replica answers 400
    load = route("POST", "/v1/load_lora_adapter", body(lora_name="a", lora_path="p", load_inplace=True), base)
    assert (load.adapter, load.admin.kind, load.admin.path, load.admin.replace) == ("a", "load", "p", True)
    merge = route("POST", "/v1/adapters/merge", body(name="m", sources=[{"name": "a", "weight": 0.5}]), base)
    assert (merge.adapter, merge.admin.kind, merge.admin.needs) == (None, "merge", ["a"])
    assert route("DELETE", "/v1/adapters/a", b"", base).admin.kind == "unload"
    assert route("POST", "/v1/unload_lora_adapter", body(lora_name="a"), base).admin.needs == ["a"]
    assert route("POST", "/v1/adapters/a/fuse", b"", base).admin.kind == "fuse"
    detail = route("GET", "/v1/adapters/a", b"", base)
    assert (detail.adapter, detail.admin, detail.read) == ("a", None, True)
    assert route("GET", "/v1/adapters", b"", base).adapter is None
    assert (route("GET", "/v1/models/a", b"", base).adapter, route("GET", "/v1/models/base-model", b"", base).adapter) \
        == ("a", None)
    tokenize = route("POST", "/tokenize", body(model="a", prompt="x"), base)
    assert (tokenize.adapter, tokenize.read) == ("a", True)
    assert route("POST", "/detokenize", body(model="base-model", tokens=[1]), base).adapter is None
    assert not route("POST", "/v1/completions", body(model="x"), base).read  # generation holds its adapter


def _ray_module(name: str):
    if str(DEPLOY_DIR) not in sys.path:
        sys.path.insert(0, str(DEPLOY_DIR))
    return __import__(f"s2ft_ray.{name}", fromlist=["_"])


def _ingress(args: dict, replicas=None, catalog=None):
    """The ingress class itself (under Ray's ASGI wrapper, whose constructor needs a running Serve)."""
    cls = _ray_module("ingress").FleetIngress.func_or_class
    return cls.__mro__[1](args, replicas, catalog)


def test_the_fleet_view_follows_the_servers_admin_rule():
    """QA: `GET /fleet` answered without the API key on a loopback fleet with no admin key."""
    from starlette.requests import Request

    class Catalog:
        class view:
            @staticmethod
            async def remote():
                return {"epoch": 7}

    def ask(args: dict, token: str | None) -> tuple[int, dict]:
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        request = Request({"type": "http", "method": "GET", "path": "/fleet", "headers": headers, "query_string": b""})
        response = asyncio.run(_ingress(args, catalog=Catalog).fleet_view(request))
        return response.status_code, json.loads(response.body)

    assert ask({"host": "127.0.0.1"}, None) == (200, {"epoch": 7})
    status, body = ask({"host": "127.0.0.1", "api_key": "sk-u"}, None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert ask({"host": "127.0.0.1", "api_key": "sk-u"}, "sk-u")[0] == 200
    assert ask({"host": "0.0.0.0"}, None)[0] == 403
    assert ask({"host": "0.0.0.0", "admin_key": "sk-a", "api_key": "sk-u"}, "sk-u")[0] == 403
    assert ask({"host": "0.0.0.0", "admin_key": "sk-a"}, "sk-a")[0] == 200


def test_the_ingress_refuses_a_body_beyond_the_limit_as_it_arrives():
    """QA: the fleet's ingress read and JSON-parsed any body before a replica answered 413 (a body declaring
    64 MiB and sending 8 got no answer; 100 MiB was parsed for 6.8 s)."""
    from starlette.requests import Request

    from s2ft_serve.errors import RequestTooLargeError

    def request(body: bytes, declared: bool) -> Request:
        chunks = [body[i: i + 64] for i in range(0, len(body), 64)] or [b""]
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive():
            return messages.pop(0)

        headers = [(b"content-length", str(len(body)).encode())] if declared else []
        return Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers,
                        "query_string": b""}, receive)

    ingress = _ingress({"host": "127.0.0.1", "max_request_bytes": 100})
    for declared in (True, False):
        with pytest.raises(RequestTooLargeError, match="--max-request-bytes"):
            asyncio.run(ingress._body(request(b"x" * 300, declared)))
        assert asyncio.run(ingress._body(request(b"y" * 90, declared))) == b"y" * 90


def test_a_replica_failure_outside_the_app_is_an_openai_error_not_rays_text():
    """QA: an exception from the replica (an unwritable catalog file) reached Ray's text/plain 500."""
    class Stream:
        def __aiter__(self):
            return self

        async def __anext__(self):
            raise RuntimeError("disk gone")

    class Replicas:
        def options(self, **_):
            return self

        @property
        def forward(self):
            return self

        def remote(self, *_):
            return Stream()

    routing, bridge = _ray_module("routing"), _ray_module("bridge")
    req = bridge.ForwardedRequest(method="POST", path="/v1/adapters", query=b"", headers=[], body=b"{}", client=None)
    start, chunks = asyncio.run(_ingress({}, replicas=Replicas())._open(req, routing.Route()))

    async def body() -> bytes:
        return b"".join([c async for c in chunks])

    assert start.status == 500 and start.header("content-type") == "application/json"
    assert json.loads(asyncio.run(body()))["error"]["message"] == "the replica failed: RuntimeError"


def test_an_unwritable_catalog_state_fails_at_start_and_a_later_write_failure_keeps_the_change(tmp_path, caplog):
    """QA: a missing folder for `catalog_state_path` answered admin calls with a 500 after applying
    them, and crashed replicas at deploy (their preloads went missing)."""
    catalog = _ray_module("catalog")
    with pytest.raises(RuntimeError, match="catalog_state_path .*no-such-dir.*cannot write"):
        catalog.AdapterCatalog(state_path=str(tmp_path / "no-such-dir" / "cat.json"))
    folder = tmp_path / "state"
    folder.mkdir()
    cat = catalog.AdapterCatalog(state_path=str(folder / "cat.json"))
    assert json.loads((folder / "cat.json").read_text()) == {}
    shutil.rmtree(folder)  # the volume goes away while serving
    epoch = asyncio.run(cat.commit("load", "x", catalog.AdapterRecord("x", 0, path="/a/x"), None))
    assert epoch == 1 and "x" in cat.records
    assert "could not be written" in caplog.text


def test_a_merge_built_from_its_recipe_keeps_only_the_merge(tiny_llama_dir, adapter_root):
    """QA: sources loaded to build a merged adapter stayed, outside Ray's multiplex LRU: a replica with
    a bound of 2 held 3 adapters."""
    holdings_mod, catalog = _ray_module("holdings"), _ray_module("catalog")
    settings = ServerSettings(model=str(tiny_llama_dir), adapter_root=str(adapter_root))
    engine = Engine(settings.engine_config()).start()
    try:
        holdings = holdings_mod.AdapterHoldings(engine, settings)
        holdings.records["mix"] = catalog.AdapterRecord("mix", 3, sources=[("a2", 0.5), ("a3", 0.5), ("a2", 1.0)])
        engine.load_adapter("a3", str(adapter_root / "a3"))  # already held: stays
        holdings.materialise("mix")
        assert holdings.held() == ["a3", "mix"]
        assert engine.get_adapter("mix").config["merged_from"][0] == {"name": "a2", "weight": 0.5}
    finally:
        engine.shutdown(timeout=5)


def test_catalog_delivers_changes_and_tracks_acknowledgements():
    """Long-poll delivery, acks through the next poll, liveness, and resync on a new catalog."""
    if str(DEPLOY_DIR) not in sys.path:
        sys.path.insert(0, str(DEPLOY_DIR))
    from s2ft_ray.catalog import AdapterCatalog, AdapterRecord, ReplicaReport

    async def scenario() -> None:
        catalog = AdapterCatalog(replica_liveness_s=0.5)
        snap = await catalog.snapshot()
        none, holds_x = ReplicaReport(), ReplicaReport(held=["x"])
        first = await catalog.poll("r1", 0, none, 0.01, snap.catalog_id)
        assert first.changes == [] and not first.resync
        await catalog.poll("r2", 0, holds_x, 0.01, snap.catalog_id)
        assert await catalog.known("x") and not await catalog.known("y")
        waiting = asyncio.ensure_future(catalog.poll("r1", 0, none, 5.0, snap.catalog_id))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        epoch = await catalog.commit("load", "y", AdapterRecord("y", 0, path="/a/y"), origin="r2")
        result = await asyncio.wait_for(waiting, 1.0)  # woken by the commit, not by its timeout
        assert [(c.epoch, c.kind, c.name, c.record.path) for c in result.changes] == [(epoch, "load", "y", "/a/y")]
        assert await catalog.wait_applied(epoch, 0.05) == ["r1", "r2"]  # neither has polled back yet
        await catalog.poll("r1", epoch, none, 0.01, snap.catalog_id)
        assert await catalog.wait_applied(epoch, 0.05) == ["r2"]
        await asyncio.sleep(0.6)  # r2 stops polling: it no longer holds admin changes up
        await catalog.poll("r1", epoch, none, 0.01, snap.catalog_id)
        assert await catalog.wait_applied(epoch, 0.05) == []
        assert not await catalog.known("x")  # only r2 held it, and r2 is gone
        assert (await catalog.poll("r1", epoch, none, 0.01, "another-catalog")).resync
        gone = await catalog.commit("unload", "y", None, origin=None)
        assert "y" not in (await catalog.snapshot()).records and gone == epoch + 1

    asyncio.run(scenario())


def replica_actors() -> dict[str, str]:
    """Replica id -> actor name of the engine replicas alive now."""
    actors = ray.util.list_named_actors(all_namespaces=True)
    names = [a["name"] for a in actors if "EngineReplica" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
    return {name.rsplit("#", 1)[-1]: name for name in names}


def test_a_replica_killed_mid_traffic_is_replaced_and_requests_keep_succeeding(fleet):
    before = replica_actors()
    assert len(before) == 2
    victim_id, victim_name = sorted(before.items())[0]
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=fleet) as client:
            while not stop.is_set():
                statuses.append(complete(client, None, max_tokens=8).status_code)

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: len(statuses) >= 6, timeout=60)
        ray.kill(ray.get_actor(victim_name, namespace="serve"), no_restart=True)
        wait_until(lambda: len(replica_actors()) == 2 and victim_id not in replica_actors(), timeout=90, step=0.5)
        served = len(statuses)
        wait_until(lambda: len(statuses) >= served + 6, timeout=60)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    with httpx.Client(base_url=fleet) as client:
        ids = wait_until(lambda: {complete(client, None).headers["x-replica-id"] for _ in range(6)} - {victim_id},
                         timeout=30)
    assert victim_id not in ids

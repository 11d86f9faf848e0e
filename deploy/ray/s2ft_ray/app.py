"""The Ray Serve application: catalog, engine replicas and ingress, bound from one set of args.

`build_app(args)` is an application builder: `serve run app:build_app model=... adapter_root=...`
or `import_path: app:build_app` with `args:` in serve_config.yaml. Per-deployment settings
(`num_replicas`, `ray_actor_options`, `max_ongoing_requests`) come from the config file's
`deployments:` section and override the defaults here.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from s2ft_ray.catalog import AdapterCatalog
from s2ft_ray.ingress import FleetIngress
from s2ft_ray.options import split_args
from s2ft_ray.replica import EngineReplica

# The catalog is tiny and long-polled by every replica: one copy, many concurrent calls.
CatalogDeployment = serve.deployment(name="AdapterCatalog", num_replicas=1, max_ongoing_requests=10_000,
                                     ray_actor_options={"num_cpus": 0})(AdapterCatalog)
# Two replicas by default; each holds a whole engine. Requests queue in the engine's own scheduler,
# so a replica takes many at once (its continuous batching needs them).
ReplicaDeployment = serve.deployment(name="EngineReplica", num_replicas=2, max_ongoing_requests=64,
                                     health_check_period_s=5, graceful_shutdown_timeout_s=30,
                                     ray_actor_options={"num_cpus": 1})(EngineReplica)


def build_app(args: dict[str, Any]) -> Application:
    """The application builder Ray calls (`import_path: app:build_app`); it takes exactly `args`."""
    return bind_app(args)


def bind_app(args: dict[str, Any] | None = None, replica_options: dict[str, Any] | None = None,
             ingress_options: dict[str, Any] | None = None) -> Application:
    """Bind the three deployments; `args` are `s2ft-serve` settings plus `FleetOptions`.

    `replica_options` / `ingress_options` (Python callers: tests, benchmarks) override deployment
    options the way a config file's `deployments:` section does.
    """
    args = dict(args or {})
    _, fleet = split_args(args)  # a bad argument fails the deploy here, not in every replica
    catalog = CatalogDeployment.bind(fleet.replica_liveness_s, fleet.catalog_state_path)
    replicas = ReplicaDeployment.options(**(replica_options or {})).bind(args, catalog)
    ingress = FleetIngress.options(**{"max_ongoing_requests": 1000, **(ingress_options or {})})
    return ingress.bind(args, replicas, catalog)

"""The application's arguments (`args:` in serve_config.yaml): server settings plus fleet options.

Keys that `s2ft-serve` knows (`model`, `adapter_root`, `api_key`, ...) become the replicas'
`ServerSettings`; the keys of `FleetOptions` tune the fleet. An unknown key is an error, so a typo
in a config file fails the deploy instead of being ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from s2ft_serve.errors import InvalidRequestError
from s2ft_serve.server.settings import ServerSettings


class FleetOptions(BaseModel):
    """Fleet-level knobs; the replica count itself lives in the deployment config (`num_replicas`)."""

    # Adapters one replica keeps registered for routing (Ray's multiplex LRU); the engine's own
    # resident bound (`max_resident_adapters`) is raised to at least this.
    max_adapters_per_replica: int = Field(8, ge=1)
    # How long an admin change waits for every live replica to apply it before answering.
    admin_ack_timeout_s: float = Field(30.0, gt=0)
    # A replica that has not polled the catalog for this long counts as gone (killed, partitioned).
    replica_liveness_s: float = Field(12.0, gt=0)
    # Long-poll period of each replica's subscription to the catalog.
    poll_interval_s: float = Field(4.0, gt=0)
    # Tries of one request on other replicas when its replica dies before answering.
    request_retries: int = Field(3, ge=0)
    # Optional JSON file on shared storage that keeps the catalog across catalog restarts.
    catalog_state_path: str | None = None


def split_args(args: dict[str, Any] | None) -> tuple[ServerSettings, FleetOptions]:
    """Validate the application's arguments into (server settings, fleet options)."""
    args = dict(args or {})
    fleet_keys = set(FleetOptions.model_fields)
    server_keys = set(ServerSettings.model_fields)
    unknown = sorted(k for k in args if k not in fleet_keys | server_keys)
    if unknown:
        raise InvalidRequestError(f"unknown application argument(s): {', '.join(unknown)}")
    fleet = FleetOptions(**{k: v for k, v in args.items() if k in fleet_keys})
    server = ServerSettings(**{k: v for k, v in args.items() if k in server_keys})
    if server.max_resident_adapters < fleet.max_adapters_per_replica:
        server = server.model_copy(update={"max_resident_adapters": fleet.max_adapters_per_replica})
    return server, fleet

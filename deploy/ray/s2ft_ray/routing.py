"""Which adapter a request is for, and whether it changes the fleet's adapters (admin).

The ingress reads only what routing needs; the replica's s2ft-serve app still validates the whole
request and answers every error. The adapter rules are the server's: the `adapter` field, else a
`model` that does not name the base model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
TOKEN_PATHS = ("/tokenize", "/detokenize")


@dataclass
class AdminOp:
    """An admin request that changes adapters; the fleet must apply it on every holder."""

    kind: str  # load | unload | fuse | unfuse | merge
    name: str
    path: str | None = None
    replace: bool = False
    sources: list[tuple[str, float]] = field(default_factory=list)

    @property
    def needs(self) -> list[str]:
        """Adapters the executing replica must hold before it runs the request."""
        if self.kind == "merge":
            return [s for s, _ in self.sources]
        if self.kind in ("fuse", "unfuse", "unload"):
            return [self.name]
        return []


@dataclass
class Route:
    adapter: str | None = None  # the multiplexed model id; None: any replica
    admin: AdminOp | None = None
    read: bool = False  # a question about the adapter: answered where it is held, never loads it on demand


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body) if body else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def adapter_of(body: dict, base_names: set[str]) -> str | None:
    """The adapter a generation request names (the server's rule), or None for the base model."""
    adapter = _text(body.get("adapter"))
    if adapter is not None:
        return None if adapter in base_names else adapter
    model = _text(body.get("model"))
    return None if model is None or model in base_names else model


def _sources(value: object) -> list[tuple[str, float]]:
    if not isinstance(value, list):
        return []
    out = []
    for item in value:
        if isinstance(item, dict) and _text(item.get("name")):
            weight = item.get("weight", 1.0)
            out.append((item["name"], float(weight) if isinstance(weight, (int, float)) else 1.0))
    return out


def admin_op(method: str, path: str, body: dict) -> AdminOp | None:
    """The adapter change a request asks for, or None (reads and generation change nothing)."""
    parts = [p for p in path.split("/") if p]
    if method == "POST" and path == "/v1/adapters" and _text(body.get("name")):
        return AdminOp("load", body["name"], path=_text(body.get("path")), replace=body.get("replace") is True)
    if method == "POST" and path == "/v1/load_lora_adapter" and _text(body.get("lora_name")):
        return AdminOp("load", body["lora_name"], path=_text(body.get("lora_path")),
                       replace=body.get("load_inplace") is True)
    if method == "POST" and path == "/v1/unload_lora_adapter" and _text(body.get("lora_name")):
        return AdminOp("unload", body["lora_name"])
    if method == "POST" and path == "/v1/adapters/merge" and _text(body.get("name")):
        return AdminOp("merge", body["name"], sources=_sources(body.get("sources")))
    if len(parts) == 3 and parts[:2] == ["v1", "adapters"] and method == "DELETE":
        return AdminOp("unload", parts[2])
    if len(parts) == 4 and parts[:2] == ["v1", "adapters"] and method == "POST" and parts[3] in ("fuse", "unfuse"):
        return AdminOp(parts[3], parts[2])
    return None


def route(method: str, path: str, body_bytes: bytes, base_names: set[str]) -> Route:
    """Routing facts of one request."""
    if method == "POST" and path in GENERATION_PATHS:
        body = _json(body_bytes)
        return Route(adapter=adapter_of(body, base_names))
    body = _json(body_bytes) if method in ("POST", "DELETE") else {}
    op = admin_op(method, path, body)
    if op is not None:
        return Route(adapter=op.name if op.kind != "merge" else None, admin=op)
    if method == "POST" and path in TOKEN_PATHS:
        return Route(adapter=adapter_of(body, base_names), read=True)
    parts = [p for p in path.split("/") if p]
    if method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "adapters"] and parts[2] != "merge":
        return Route(adapter=parts[2], read=True)  # the holder answers with its live numbers
    if method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "models"]:
        return Route(adapter=None if parts[2] in base_names else parts[2], read=True)
    return Route()

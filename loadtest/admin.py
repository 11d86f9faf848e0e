"""The server's model list, admin API and memory readings, as the load tester uses them.

`/v1/models` and vLLM's `/v1/load_lora_adapter` work on both s2ft-serve and vLLM; replace, fuse
and unfuse are s2ft-serve's own routes. Every call returns an `AdminResult` (status and message)
instead of raising, so chaos mode can count refusals and failures alike.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import httpx

from loadtest.client import error_message
from loadtest.errors import LoadtestConfigError


@dataclass
class AdminResult:
    op: str  # load | replace | unload | fuse | unfuse
    name: str
    status: int  # 0: no answer (timeout, connection)
    message: str
    seconds: float


class AdminClient:
    """Admin calls against one server; `admin_key` goes in the bearer header of every call."""

    def __init__(self, client: httpx.AsyncClient, admin_key: str | None = None, api_key: str | None = None):
        self._client = client
        key = admin_key or api_key
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._api_headers = {"Authorization": f"Bearer {api_key}"} if api_key else self._headers

    async def models(self) -> list[dict]:
        """The `data` list of `/v1/models` (the base model first on s2ft-serve and vLLM)."""
        try:
            response = await self._client.get("/v1/models", headers=self._api_headers)
        except httpx.HTTPError as exc:
            raise LoadtestConfigError(f"cannot reach {self._client.base_url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise LoadtestConfigError(f"GET /v1/models answered {response.status_code}: {error_message(response.text)}")
        return list(response.json().get("data") or [])

    async def base_model(self) -> str:
        """The id of the model that is not an adapter (no `parent`)."""
        for entry in await self.models():
            if not entry.get("parent"):
                return str(entry["id"])
        raise LoadtestConfigError("GET /v1/models lists no base model (every entry has a parent)")

    async def loaded_adapters(self) -> set[str]:
        return {str(e["id"]) for e in await self.models() if e.get("parent")}

    async def load(self, name: str, path: str, replace: bool = False, op: str = "load") -> AdminResult:
        body = {"name": name, "path": path, "replace": replace}
        return await self._call(op, name, "POST", "/v1/adapters", body)

    async def put(self, name: str, path: str, op: str = "load") -> AdminResult:
        """Load `name` from `path`, replacing whatever is loaded under that name."""
        result = await self.load(name, path, replace=True, op=op)
        if result.status == 404:  # servers that only replace what is loaded
            result = await self.load(name, path, replace=False, op=op)
        return result

    async def load_vllm(self, name: str, path: str) -> AdminResult:
        body = {"lora_name": name, "lora_path": path}
        return await self._call("load", name, "POST", "/v1/load_lora_adapter", body)

    async def unload(self, name: str, op: str = "unload") -> AdminResult:
        return await self._call(op, name, "DELETE", f"/v1/adapters/{name}")

    async def fuse(self, name: str) -> AdminResult:
        return await self._call("fuse", name, "POST", f"/v1/adapters/{name}/fuse")

    async def unfuse(self, name: str) -> AdminResult:
        return await self._call("unfuse", name, "POST", f"/v1/adapters/{name}/unfuse")

    async def _call(self, op: str, name: str, method: str, path: str, body: dict | None = None) -> AdminResult:
        start = time.perf_counter()
        try:
            response = await self._client.request(method, path, json=body, headers=self._headers)
            status, message = response.status_code, ("" if response.is_success else error_message(response.text))
        except httpx.HTTPError as exc:
            status, message = 0, f"{type(exc).__name__}: {exc}"
        return AdminResult(op=op, name=name, status=status, message=message, seconds=time.perf_counter() - start)


def adapter_path(server_dir: str | None, folder: str) -> str:
    """The path to send for an adapter folder: under `server_dir`, or relative (s2ft-serve resolves it
    under its --adapter-root; vLLM needs absolute paths, so give `server_dir` there)."""
    return f"{server_dir.rstrip('/')}/{folder}" if server_dir else folder


async def scrape_metric(client: httpx.AsyncClient, name: str) -> float | None:
    """One unlabelled sample of `/metrics` (e.g. process_resident_memory_bytes), or None."""
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse_metric(response.text, name)


def process_rss_bytes(pid: int) -> float | None:
    """Resident memory of a local process from /proc (Linux), or None where unreadable."""
    try:
        for line in open(f"/proc/{pid}/status", encoding="ascii"):
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def parse_metric(text: str, name: str) -> float | None:
    """The value of the first sample of `name` (labels ignored) in Prometheus text format."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+(\S+)", re.MULTILINE)
    match = pattern.search(text)
    return float(match.group(1)) if match else None

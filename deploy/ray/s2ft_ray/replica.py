"""One engine replica: the unchanged s2ft-serve app in process, multiplexed by adapter.

Every request arrives as a `ForwardedRequest` with the adapter as Ray's multiplexed model id. The
replica registers the adapter with `serve.multiplexed` (so Ray's router sends later requests for
it here, and its LRU bounds how many adapters one replica holds), then runs the request through
its app and streams the response back with an `x-replica-id` header. Admin changes run here
first, are published to the catalog, and answer once every live replica has applied them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from ray import serve

from s2ft_serve.engine.engine import Engine
from s2ft_serve.errors import ConflictError, S2FTError
from s2ft_serve.server.app import create_app
from s2ft_serve.server.errors import domain_error_response

from s2ft_ray.bridge import ForwardedRequest, ResponseStart, call_app
from s2ft_ray.catalog import AdapterRecord
from s2ft_ray.holdings import AdapterHoldings
from s2ft_ray.options import split_args
from s2ft_ray.routing import AdminOp

log = logging.getLogger(__name__)

REPLICA_HEADER = b"x-replica-id"


class AdapterLease:
    """What Ray's multiplex cache holds per adapter; its eviction frees the engine's copy."""

    def __init__(self, name: str, on_release) -> None:
        self.name = name
        self._on_release = on_release

    def __del__(self) -> None:  # Ray calls it on LRU eviction (in a thread); the GC may call it again
        release, self._on_release = self._on_release, None
        if release is not None:
            release(self.name)


class EngineReplica:
    """A Ray Serve replica holding one Engine and a bounded set of adapters."""

    async def __init__(self, args: dict, catalog) -> None:
        settings, self.fleet = split_args(args)
        self.preload = settings.adapter_specs()
        self.settings = settings.model_copy(update={"adapter": []})  # preloads become catalog records
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.catalog = catalog
        self.loop = asyncio.get_running_loop()
        self.engine = await asyncio.to_thread(lambda: Engine(self.settings.engine_config()).start())
        self.holdings = AdapterHoldings(self.engine, self.settings)
        self.app = create_app(self.settings, self.engine)

        async def s2ft_adapter_lease(name: str) -> AdapterLease:  # a plain function: Ray keeps its cache on it
            return await self._open_lease(name)

        self.lease = serve.multiplexed(max_num_models_per_replica=self.fleet.max_adapters_per_replica)(
            s2ft_adapter_lease)
        self.catalog_id: str | None = None
        self.applied = 0
        await self._resync()
        await self._publish_preloads()
        self.sync_task = asyncio.ensure_future(self._sync_loop())
        log.info("replica %s ready: model %s, at most %d adapters", self.replica_id, self.engine.model_name,
                 self.fleet.max_adapters_per_replica)

    # ---- requests ------------------------------------------------------------------------
    async def forward(self, req: ForwardedRequest, op: AdminOp | None = None,
                      read: bool = False) -> AsyncIterator[ResponseStart | bytes]:
        """Run one HTTP request through the app; yields the response start, then body chunks.

        A `read` (adapter details, tokenize) materialises only an adapter the catalog records (loaded
        in the fleet, perhaps held nowhere now); anything else is answered from what this replica
        holds, as the single server answers without loading.
        """
        if op is not None:
            async for item in self._admin(req, op):
                yield item
            return
        adapter = serve.get_multiplexed_model_id()
        if adapter and (not read or adapter in self.holdings.records):
            await self._hold(adapter)
        async for item in call_app(self.app, req):
            yield self._tag(item)

    async def describe(self) -> dict:
        """Who this replica is and which names mean the base model (the ingress's routing)."""
        base_names = {self.engine.model_name}
        if self.settings.model:
            base_names.add(self.settings.model)
        return {"replica_id": self.replica_id, "model": self.engine.model_name,
                "base_names": sorted(base_names), "held": self.holdings.held()}

    async def _open_lease(self, name: str) -> AdapterLease:
        await asyncio.to_thread(self.holdings.materialise, name)
        self.loop.call_soon(self._report_held)
        return AdapterLease(name, self._release)

    def _release(self, name: str) -> None:
        self.holdings.release(name)
        self.loop.call_soon_threadsafe(self._report_held)

    async def _hold(self, name: str) -> bool:
        """Register `name` here (loading it if needed); False when it cannot be (the app says why)."""
        try:
            await self.lease(name)
            if not self.engine.has_adapter(name):  # unloaded by an admin change, still registered with Ray
                await asyncio.to_thread(self.holdings.materialise, name)
            return True
        except S2FTError:
            return False

    def _tag(self, item: ResponseStart | bytes) -> ResponseStart | bytes:
        if isinstance(item, ResponseStart):
            item.headers.append((REPLICA_HEADER, self.replica_id.encode()))
        return item

    # ---- admin ---------------------------------------------------------------------------
    async def _admin(self, req: ForwardedRequest, op: AdminOp) -> AsyncIterator[ResponseStart | bytes]:
        if op.kind in ("load", "merge") and not op.replace and await self.catalog.known.remote(op.name):
            response = domain_error_response(ConflictError(
                f"adapter '{op.name}' is already loaded in the fleet (use replace to swap it)", param="name"))
            yield self._tag(ResponseStart(response.status_code, list(response.raw_headers)))
            yield bytes(response.body)
            return
        for name in op.needs:
            await self._hold(name)
        start, chunks = None, []
        async for item in call_app(self.app, req):
            if isinstance(item, ResponseStart):
                start = item
            else:
                chunks.append(item)
        if start is not None and 200 <= start.status < 300:
            start.headers.extend(await self._publish(op))
        yield self._tag(start)
        for chunk in chunks:
            yield chunk

    async def _publish(self, op: AdminOp) -> list[tuple[bytes, bytes]]:
        """Tell the fleet; wait until every live replica has applied it. Returns response headers."""
        record = await asyncio.to_thread(self.holdings.record_after, op)
        epoch = await self.catalog.commit.remote(op.kind, op.name, record, self.replica_id)
        if op.kind in ("load", "merge"):
            await self._hold(op.name)
        lagging = await self.catalog.wait_applied.remote(epoch, self.fleet.admin_ack_timeout_s)
        if lagging:
            log.warning("admin %s %s: replicas %s had not applied epoch %d in time", op.kind, op.name, lagging, epoch)
        headers = [(b"x-fleet-epoch", str(epoch).encode())]
        if lagging:
            headers.append((b"x-fleet-lagging", ",".join(lagging).encode()))
        return headers

    async def _publish_preloads(self) -> None:
        for name, path in self.preload.items():
            if not await self.catalog.known.remote(name):
                await self.catalog.commit.remote("load", name, AdapterRecord(name, 0, path=path), None)

    # ---- catalog subscription ------------------------------------------------------------
    async def _resync(self) -> None:
        snapshot = await self.catalog.snapshot.remote()
        await asyncio.to_thread(self.holdings.resync, snapshot.records)
        self.catalog_id, self.applied = snapshot.catalog_id, snapshot.epoch

    async def _sync_loop(self) -> None:
        while True:
            try:
                result = await self.catalog.poll.remote(self.replica_id, self.applied, self.holdings.report(),
                                                        self.fleet.poll_interval_s, self.catalog_id)
                if result.resync:
                    await self._resync()
                    continue
                for change in result.changes:
                    await asyncio.to_thread(self.holdings.apply, change, self.replica_id)
                    self.applied = change.epoch
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the catalog restarting, a network blip: retry, then resync
                log.warning("catalog poll failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
                self.catalog_id = None

    def _report_held(self) -> None:
        self.catalog.report.remote(self.replica_id, self.holdings.report())

    # ---- Ray Serve hooks -----------------------------------------------------------------
    def check_health(self) -> None:
        if self.sync_task.done():
            raise RuntimeError("the catalog subscription has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=self.settings.drain_timeout_s)

"""One replica's adapters: materialise them on demand and keep them in step with the catalog.

An adapter is materialised from its catalog record (a folder, or a merge recipe) or, without a
record, from the shared `adapter_root` by name, exactly as the single server loads lazily. Catalog
changes are applied only to adapters this replica holds: a replica that does not hold an adapter
has nothing stale and reads the current record when it first needs it. Blocking (file IO, waits
for a step boundary): call from a worker thread.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace as copy_with

from s2ft_serve.engine.engine import Engine
from s2ft_serve.errors import AdapterNotFoundError, S2FTError
from s2ft_serve.server.settings import ServerSettings

from s2ft_ray.catalog import AdapterRecord, Change, ReplicaReport
from s2ft_ray.routing import AdminOp

log = logging.getLogger(__name__)


class AdapterHoldings:
    """The catalog records this replica knows and the generation of each adapter it holds."""

    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.records: dict[str, AdapterRecord] = {}
        self.generations: dict[str, int] = {}  # held adapter -> record generation (0: from the root)
        self.loads = 0  # on-demand loads: each is a request that reached a replica without its adapter
        self.lock = threading.RLock()  # one materialisation or change at a time

    def held(self) -> list[str]:
        return sorted(info.name for info in self.engine.list_adapters())

    def report(self) -> ReplicaReport:
        infos = self.engine.list_adapters()
        return ReplicaReport(held=sorted(i.name for i in infos), fused=sorted(i.name for i in infos if i.fused),
                             loads=self.loads)

    # ---- on demand -----------------------------------------------------------------------
    def materialise(self, name: str) -> None:
        """Make `name` loaded in the engine (no-op when it is); domain errors say why not."""
        with self.lock:
            if self.engine.has_adapter(name):
                return
            record = self.records.get(name)
            if record is None:
                self.engine.load_adapter(name, str(self.engine.lazy_folder(name)))
            else:
                self._build(record)
            self.generations[name] = record.generation if record else 0
            self.loads += 1

    def _build(self, record: AdapterRecord, replace: bool = False) -> None:
        if record.sources is not None:
            # Sources loaded only to build the merge leave again: Ray's multiplex LRU never leased them,
            # so nothing else would free them and the replica would hold more than its bound.
            transient = [s for s in dict.fromkeys(n for n, _ in record.sources) if not self.engine.has_adapter(s)]
            try:
                for source, _ in record.sources:
                    self.materialise(source)
                if replace and self.engine.has_adapter(record.name):
                    self.engine.remove_adapter(record.name)
                self.engine.merge(record.name, list(record.sources))
            finally:
                for source in transient:
                    self.release(source)
        else:
            self.engine.load_adapter(record.name, record.path, replace=replace)
        if record.fused:
            self._try("fuse", record.name, self.engine.fuse)

    def release(self, name: str) -> None:
        """Ray's multiplex LRU dropped `name`: free its engine slot (a fused adapter stays)."""
        with self.lock:
            try:
                if not self.engine.get_adapter(name).fused:
                    self.engine.remove_adapter(name)
                    self.generations.pop(name, None)
            except AdapterNotFoundError:
                self.generations.pop(name, None)

    # ---- catalog changes -----------------------------------------------------------------
    def apply(self, change: Change, replica_id: str) -> None:
        """Bring this replica in line with one catalog change."""
        with self.lock:
            if change.record is None:
                self.records.pop(change.name, None)
            else:
                self.records[change.name] = change.record
            if change.origin == replica_id:  # this replica ran the admin request itself
                if change.record is not None and self.engine.has_adapter(change.name):
                    self.generations[change.name] = change.record.generation
                return
            if not self.engine.has_adapter(change.name):
                return
            self._apply_to_held(change)

    def _apply_to_held(self, change: Change) -> None:
        name, record = change.name, change.record
        if record is None:
            self._try("unload", name, self.engine.remove_adapter)
            self.generations.pop(name, None)
        elif change.kind in ("fuse", "unfuse"):
            self._try(change.kind, name, self.engine.fuse if change.kind == "fuse" else self.engine.unfuse)
            self.generations[name] = record.generation
        else:
            try:
                self._build(record, replace=True)
                self.generations[name] = record.generation
            except S2FTError as exc:  # the origin validated it; drop ours so the next request reloads
                log.error("replacing adapter %s failed (%s); unloading the stale copy", name, exc)
                self._try("unload", name, self.engine.remove_adapter)

    def resync(self, records: dict[str, AdapterRecord]) -> None:
        """Take a full snapshot (a new or restarted catalog): rebuild held adapters that changed."""
        with self.lock:
            self.records = dict(records)
            for name in self.held():
                record = records.get(name)
                if record is not None and self.generations.get(name) != record.generation:
                    self._apply_to_held(Change(record.generation, "load", name, record, None))

    @staticmethod
    def _try(what: str, name: str, fn) -> None:
        try:
            fn(name)
        except S2FTError as exc:
            log.warning("%s %s on this replica: %s", what, name, exc)

    # ---- admin ---------------------------------------------------------------------------
    def record_after(self, op: AdminOp) -> AdapterRecord | None:
        """The record that describes `name` after this replica ran `op` successfully."""
        if op.kind == "unload":
            return None
        if op.kind == "merge":
            return AdapterRecord(op.name, 0, sources=list(op.sources))
        info = self.engine.get_adapter(op.name)
        if op.kind == "load":
            return AdapterRecord(op.name, 0, path=info.path)
        known = self.records.get(op.name) or AdapterRecord(op.name, 0, path=info.path)
        return copy_with(known, fused=op.kind == "fuse")

"""The fleet's adapter catalog: which adapters exist, where each replica stands, and admin changes.

One catalog (a single-replica deployment) is the source of truth for admin state. Adapters under
the shared `adapter_root` need no record (any replica loads them by name); a record exists for
adapters loaded from another path, merged adapters (their recipe), replaced ones (a new
generation) and fused ones. Every change gets an epoch. Replicas long-poll `poll()` for changes
newer than the epoch they have applied; the poll itself is the acknowledgement, so
`wait_applied(epoch)` can tell the admin call when every live replica has the change.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class AdapterRecord:
    """How any replica materialises adapter `name`: from a folder, or by merging sources."""

    name: str
    generation: int  # bumps on every load or replace; holders of an older one reload
    path: str | None = None  # a folder on shared storage
    sources: list[tuple[str, float]] | None = None  # a merge recipe: (adapter, weight)
    fused: bool = False


@dataclass
class Change:
    """One admin change: `record` is the adapter's new state, None when it was unloaded."""

    epoch: int
    kind: str  # load | unload | fuse | unfuse | merge (what holders must do)
    name: str
    record: AdapterRecord | None
    origin: str | None  # the replica that already applied it (it ran the admin request)


@dataclass
class ReplicaReport:
    """What a replica tells the catalog about itself with every poll (and after loads, evictions)."""

    held: list[str] = field(default_factory=list)  # adapters in its engine
    fused: list[str] = field(default_factory=list)  # of those, the fused ones
    loads: int = 0  # adapters it has loaded on demand since it started (routing misses)


@dataclass
class ReplicaView:
    acked: int = 0  # the last epoch this replica has applied
    last_seen: float = field(default_factory=time.monotonic)
    report: ReplicaReport = field(default_factory=ReplicaReport)


@dataclass
class Snapshot:
    """What a replica needs to start or resync: the epoch and every record."""

    catalog_id: str
    epoch: int
    records: dict[str, AdapterRecord]


@dataclass
class PollResult:
    catalog_id: str
    epoch: int
    changes: list[Change]
    resync: bool  # the replica is behind the kept history (or on another catalog): take a snapshot


class AdapterCatalog:
    """Admin state of the fleet, with long-poll change delivery and acknowledgement tracking."""

    HISTORY = 1024  # changes kept for replicas that fall behind; older ones resync from a snapshot

    def __init__(self, replica_liveness_s: float = 12.0, state_path: str | None = None) -> None:
        self.catalog_id = f"{os.getpid()}-{time.time_ns()}"
        self.liveness_s = replica_liveness_s
        self.state_path = Path(state_path) if state_path else None
        self.records: dict[str, AdapterRecord] = self._restore()
        if self.state_path is not None:  # an unwritable state file fails the deploy, not a later admin call
            try:
                self._write_state()
            except OSError as exc:
                raise RuntimeError(f"catalog_state_path {self.state_path}: cannot write the catalog's state "
                                   f"({exc.strerror or exc}); give a writable file on shared storage, or none") from exc
        self.epoch = max((r.generation for r in self.records.values()), default=0)  # stays monotonic
        self.changes: list[Change] = []
        self.replicas: dict[str, ReplicaView] = {}
        self.cond = asyncio.Condition()

    # ---- replicas ------------------------------------------------------------------------
    async def snapshot(self) -> Snapshot:
        return Snapshot(self.catalog_id, self.epoch, dict(self.records))

    async def poll(self, replica_id: str, acked: int, report: ReplicaReport, timeout_s: float,
                   catalog_id: str | None = None) -> PollResult:
        """Record that `replica_id` applied everything up to `acked`; wait for newer changes."""
        self._seen(replica_id, acked, report)
        if catalog_id != self.catalog_id or acked > self.epoch or self._behind_history(acked):
            return PollResult(self.catalog_id, self.epoch, [], resync=True)
        async with self.cond:
            if self.epoch <= acked:
                try:
                    await asyncio.wait_for(self.cond.wait_for(lambda: self.epoch > acked), timeout_s)
                except asyncio.TimeoutError:
                    pass
        self._seen(replica_id, acked, report)
        return PollResult(self.catalog_id, self.epoch, [c for c in self.changes if c.epoch > acked], resync=False)

    async def report(self, replica_id: str, report: ReplicaReport) -> None:
        """A replica's adapters changed (a load, an eviction, a fuse)."""
        view = self.replicas.setdefault(replica_id, ReplicaView())
        view.report, view.last_seen = report, time.monotonic()

    def _seen(self, replica_id: str, acked: int, report: ReplicaReport) -> None:
        view = self.replicas.setdefault(replica_id, ReplicaView())
        view.acked = max(view.acked, acked) if acked <= self.epoch else 0
        view.report, view.last_seen = report, time.monotonic()

    def _behind_history(self, acked: int) -> bool:
        return bool(self.changes) and acked < self.changes[0].epoch - 1

    def _live(self) -> dict[str, ReplicaView]:
        now = time.monotonic()
        return {rid: v for rid, v in self.replicas.items() if now - v.last_seen <= self.liveness_s}

    # ---- admin ---------------------------------------------------------------------------
    async def known(self, name: str) -> bool:
        """Whether `name` is loaded somewhere in the fleet (a record, or held by a live replica)."""
        return name in self.records or any(name in v.report.held for v in self._live().values())

    async def record(self, name: str) -> AdapterRecord | None:
        return self.records.get(name)

    async def commit(self, kind: str, name: str, record: AdapterRecord | None, origin: str | None) -> int:
        """Publish a change (`record` None unloads); returns its epoch."""
        async with self.cond:
            self.epoch += 1
            if record is None:
                self.records.pop(name, None)
            else:
                record.generation = self.epoch
                self.records[name] = record
            self.changes.append(Change(self.epoch, kind, name, record, origin))
            del self.changes[:-self.HISTORY]
            self.cond.notify_all()
        self._persist()
        log.info("catalog epoch %d: %s %s (origin %s)", self.epoch, kind, name, origin)
        return self.epoch

    async def wait_applied(self, epoch: int, timeout_s: float) -> list[str]:
        """Wait until every live replica has applied `epoch`; returns the replicas still behind."""
        deadline = time.monotonic() + timeout_s
        while True:
            lagging = sorted(rid for rid, v in self._live().items() if v.acked < epoch)
            if not lagging or time.monotonic() >= deadline:
                return lagging
            await asyncio.sleep(0.02)

    async def view(self) -> dict:
        """The fleet as operators see it (`GET /fleet`)."""
        now = time.monotonic()
        live = self._live()
        return {
            "epoch": self.epoch,
            "records": {n: asdict(r) for n, r in sorted(self.records.items())},
            "replicas": {rid: {**asdict(v.report), "acked": v.acked, "live": rid in live,
                               "seen_s_ago": round(now - v.last_seen, 3)}
                         for rid, v in sorted(self.replicas.items())},
        }

    # ---- persistence ---------------------------------------------------------------------
    def _persist(self) -> None:
        """Keep the records on disk; a failed write (disk full, volume gone) is logged, the change stands."""
        if self.state_path is None:
            return
        try:
            self._write_state()
        except OSError as exc:
            log.error("catalog state %s could not be written (%s); the change holds in memory only",
                      self.state_path, exc)

    def _write_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: asdict(r) for n, r in self.records.items()}, indent=1))
        os.replace(tmp, self.state_path)

    def _restore(self) -> dict[str, AdapterRecord]:
        if self.state_path is None or not self.state_path.is_file():
            return {}
        try:
            data = json.loads(self.state_path.read_text())
            records = {}
            for name, fields in data.items():
                sources = fields.get("sources")
                fields["sources"] = [(str(s), float(w)) for s, w in sources] if sources else None
                records[name] = AdapterRecord(**fields)
            return records
        except (ValueError, TypeError, OSError) as exc:
            log.error("catalog state %s is unreadable (%s); starting empty", self.state_path, exc)
            return {}

"""The resident adapter set: names, versions, slots, LRU eviction and fusion state.

Every method runs under the engine's step lock, so a forward pass never sees a half-installed
adapter. A request pins the *version* it was admitted with: replacing or removing an adapter
retires the version, whose slot is freed only when its last request finishes.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from s2ft_serve.adapters import native
from s2ft_serve.adapters.format import Adapter
from s2ft_serve.adapters.layers import NULL_SLOT, S2FTLinear
from s2ft_serve.errors import AdapterNotFoundError, ConflictError, QueueFullError


_version_ids = itertools.count(1)


@dataclass(eq=False)
class AdapterVersion:
    name: str
    slot: int
    adapter: Adapter
    refs: int = 0
    retired: bool = False
    uid: int = field(default_factory=lambda: next(_version_ids))  # never reused (0 stands for the base)


@dataclass(eq=False)
class Entry:
    name: str
    path: Path | None  # None: added from memory, so never evicted
    config: dict
    nbytes: int
    summary: dict
    version: AdapterVersion | None = None  # None: evicted, reloads from `path` on next use
    digest: str | None = None  # its safetensors file's sha256 as loaded: a reload must find the same
    requests_served: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Fused:
    version: AdapterVersion
    correction_slot: int  # holds -delta, applied to every token not of this adapter
    saved: list[torch.Tensor]  # the original columns, per module of the version's fusion plan


def _locked(method):
    """Run under the registry's own lock: request threads pin versions without the step lock."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper


def _columns(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(a view of W, the dim along which W's columns lie in it): `W.t()` and 0 where W is stored
    column-major (see layers; each column then a contiguous row), else W itself and 1."""
    return (weight.t(), 0) if weight.t().is_contiguous() else (weight, 1)


class AdapterRegistry:
    def __init__(self, layers: dict[str, S2FTLinear], max_resident: int, max_resident_bytes: int,
                 head_dim: int, max_fused: int = 1):
        self.layers = layers
        self.lock = threading.RLock()  # always taken after the engine's step lock, never before
        self.max_resident = max_resident
        self.max_resident_bytes = max_resident_bytes
        self.head_dim = head_dim
        self.max_fused = max_fused
        self.entries: dict[str, Entry] = {}
        self.fused: list[Fused] = []
        self._corrections: dict[AdapterVersion, int] = {}  # cached -delta slots, see _correction_slot
        self._plans: dict[AdapterVersion, list] = {}  # cached fusion plans, dropped with the corrections
        self._free: list[int] = []
        self._next_slot = NULL_SLOT + 1
        self._capacity = 0
        # a hard cap on slots: resident adapters + retired versions still in flight + corrections
        self.max_slots = max_resident + 64 + 2 * max_fused + 2
        self.epoch = 0  # bumped whenever the base weights change (fuse, unfuse): cached keys/values go stale
        # called with each version that retires (replaced, removed, evicted): nothing will run on it anew
        self.on_retire: Callable[[AdapterVersion], None] = lambda version: None

    # ---- slots -------------------------------------------------------------------------
    def _alloc_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next_slot > self.max_slots:
            raise QueueFullError("no free adapter slot: too many adapter versions in flight; retry later")
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        if slot > self._capacity:
            self._capacity = max(slot, 2 * self._capacity, 4)
            for layer in self.layers.values():
                layer.reserve(self._capacity, 1)
        return slot

    def _free_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.reset_slot(slot)
        self._free.append(slot)

    def _write(self, slot: int, adapter: Adapter, sign: float = 1.0) -> None:
        for name, md in adapter.modules.items():
            self.layers[name].set_slot(slot, md.index, md.delta if sign == 1.0 else -md.delta)

    # ---- install / remove ----------------------------------------------------------------
    @_locked
    def install(self, name: str, adapter: Adapter, path: Path | None, replace: bool) -> Entry:
        old = self.entries.get(name)
        if old is not None and not replace:
            raise ConflictError(f"adapter '{name}' is already loaded (use replace to swap it)", param="name")
        if path is None:  # held only in memory: never evicted, so with the others never evicted it must fit
            self.check_memory_room(name, adapter.nbytes)
        self._evict(extra_count=1, extra_bytes=adapter.nbytes, keep=name)
        slot = self._alloc_slot()
        self._write(slot, adapter)
        version = AdapterVersion(name=name, slot=slot, adapter=adapter)
        was_fused = old is not None and self.is_fused(name)
        if old is not None:
            self._drop(old)
        entry = Entry(name=name, path=path, config=adapter.config, nbytes=adapter.nbytes,
                      summary=adapter.summary(self.head_dim), version=version, digest=adapter.digest)
        if old is not None:
            entry.requests_served = old.requests_served
        self.entries[name] = entry
        if was_fused:
            self.fuse(name)
        return entry

    @_locked
    def check_memory_room(self, name: str, nbytes: int, doing: str = "adding") -> None:
        """Refuse `name`, an adapter held only in memory (or to be fused), when the limits cannot hold it
        beside the others that are never evicted: those held only in memory, and the fused ones (QA:
        they were not counted)."""
        held = [e for e in self.entries.values() if e.name != name
                and (e.path is None or (e.version is not None and self.is_fused(e.name)))]
        held_bytes = sum(e.nbytes for e in held)
        if len(held) + 1 > self.max_resident or held_bytes + nbytes > self.max_resident_bytes:
            raise ConflictError(
                f"{len(held)} adapter(s) are never evicted (held only in memory: merged, or added without a "
                f"folder; or fused), using {held_bytes} bytes; {doing} '{name}' ({nbytes} bytes) would exceed "
                f"max_resident_adapters ({self.max_resident}) or max_resident_bytes ({self.max_resident_bytes}): "
                "unload or unfuse one, or save a merge to a folder (s2ft-adapter merge) and load that",
                param="name")

    @_locked
    def reload(self, entry: Entry, adapter: Adapter) -> None:
        """Make an evicted entry resident again, from the very files it was loaded from (QA: files changed
        since were served under the old name, with the old size, config and memory accounting)."""
        if adapter.digest != entry.digest or adapter.config != entry.config:
            raise ConflictError(f"adapter '{entry.name}' changed on disk since it was loaded (it was evicted "
                                "since, to make room): load it again with replace to serve the new files",
                                param="model")
        self._evict(extra_count=1, extra_bytes=adapter.nbytes, keep=entry.name)
        slot = self._alloc_slot()
        self._write(slot, adapter)
        entry.version = AdapterVersion(name=entry.name, slot=slot, adapter=adapter)

    @_locked
    def remove(self, name: str) -> None:
        self._drop(self.get(name))
        del self.entries[name]

    def _drop(self, entry: Entry) -> None:
        if self.is_fused(entry.name):
            self.unfuse(entry.name)
        if entry.version is not None:
            self._retire(entry.version)
            entry.version = None

    def _retire(self, version: AdapterVersion) -> None:
        version.retired = True
        self.on_retire(version)
        if version in self._corrections:
            self._free_slot(self._corrections.pop(version))
        self._plans.pop(version, None)
        if version.refs == 0:
            self._free_slot(version.slot)

    def _evict(self, extra_count: int, extra_bytes: int, keep: str) -> None:
        """Evict least-recently-used idle, unfused adapters until the new one fits (or, with no new one,
        until the resident ones are within the limits again). `keep`'s own resident version does not count:
        the new one takes its place (QA: replacing an adapter evicted another to make room for both)."""
        def over() -> bool:
            resident = [e for e in self.entries.values() if e.version is not None and e.name != keep]
            return (len(resident) + extra_count > self.max_resident
                    or sum(e.nbytes for e in resident) + extra_bytes > self.max_resident_bytes)

        while over():
            idle = [e for e in self.entries.values()
                    if e.version is not None and e.version.refs == 0 and e.path is not None
                    and e.name != keep and not self.is_fused(e.name)]
            if not idle:
                return  # everything resident is busy or pinned: allow a temporary overshoot
            victim = min(idle, key=lambda e: e.last_used)
            self._retire(victim.version)
            victim.version = None

    # ---- requests ------------------------------------------------------------------------
    @_locked
    def get(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            raise AdapterNotFoundError(name)
        return entry

    @_locked
    def acquire(self, entry: Entry) -> AdapterVersion:
        assert entry.version is not None
        entry.version.refs += 1
        entry.last_used = time.monotonic()
        return entry.version

    @_locked
    def count_served(self, version: AdapterVersion) -> None:
        """One more request served by `version`'s adapter: counted once it is queued (or has run), so
        a request refused after pinning (queue full, another request of its group refused) is not."""
        entry = self.entries.get(version.name)
        if entry is not None:
            entry.requests_served += 1

    @_locked
    def release(self, version: AdapterVersion) -> None:
        version.refs -= 1
        if version.refs == 0:
            if version.retired:
                self._free_slot(version.slot)
            else:  # a burst of busy adapters may have overshot the limits: back under them once idle
                self._evict(extra_count=0, extra_bytes=0, keep="")

    def slots_for(self, version: AdapterVersion | None) -> tuple[int, ...]:
        """The slots a token of `version` (None: the base) needs, given what is fused."""
        own = () if version is None or any(f.version is version for f in self.fused) else (version.slot,)
        return own + tuple(f.correction_slot for f in self.fused if f.version is not version)

    # ---- fusion --------------------------------------------------------------------------
    def is_fused(self, name: str) -> bool:
        return any(f.version.name == name and not f.version.retired for f in self.fused)

    @_locked
    def check_fusable(self, name: str) -> None:
        """Raise ConflictError when fusing `name` now would be refused (it need not be loaded)."""
        if self.is_fused(name):
            raise ConflictError(f"adapter '{name}' is already fused", param="name")
        if len(self.fused) >= self.max_fused:
            raise ConflictError(
                f"{len(self.fused)} adapter(s) already fused ({', '.join(f.version.name for f in self.fused)}); "
                f"at most {self.max_fused} may be fused: unfuse first", param="name")
        entry = self.entries.get(name)
        if entry is not None:  # fused, it is never evicted (QA: fusing let those exceed the bounds)
            self.check_memory_room(name, entry.nbytes, "fusing")

    @_locked
    def fuse(self, name: str) -> None:
        entry = self.get(name)
        self.check_fusable(name)
        assert entry.version is not None, "fuse needs a resident adapter"
        correction = self._correction_slot(entry.version)
        self.fused.append(Fused(entry.version, correction, self._add_columns(entry.version)))

    @_locked
    def unfuse(self, name: str) -> None:
        target = next((f for f in self.fused if f.version.name == name), None)
        if target is None:
            raise ConflictError(f"adapter '{name}' is not fused", param="name")
        at = self.fused.index(target)
        later = self.fused[at + 1:]
        for f in reversed(self.fused[at:]):  # restore in reverse order: overlaps stay exact
            self._restore_columns(f.version, f.saved)
        self.fused = self.fused[:at]
        for f in later:
            f.saved = self._add_columns(f.version)
            self.fused.append(f)

    def _correction_slot(self, version: AdapterVersion) -> int:
        """The slot holding `-delta` of `version`, kept after unfuse so switching back costs nothing.

        At most `max_fused + 2` corrections stay cached; the least recently used beyond go."""
        slot = self._corrections.pop(version, None)
        if slot is None:
            slot = self._alloc_slot()
            self._write(slot, version.adapter, sign=-1.0)
        self._corrections[version] = slot  # most recently used last
        fused = {f.version for f in self.fused} | {version}
        idle = [v for v in self._corrections if v not in fused]  # least recently used first
        for stale in idle[: max(0, len(self._corrections) - self.max_fused - 2)]:
            self._free_slot(self._corrections.pop(stale))
            self._plans.pop(stale, None)
        return slot

    def _plan(self, version: AdapterVersion) -> list[tuple]:
        """Per module (a view of W, the dim of its columns, index, delta laid out along that dim,
        contiguous, the compiled row-by-row edits or None), ready for fusing.

        Cached beside the version's correction slot, so a switch runs two or three tensor ops
        per module and no Python lookups or conversions."""
        plan = self._plans.get(version)
        if plan is None:
            plan = []
            for name, md in version.adapter.modules.items():
                view, dim = _columns(self.layers[name].base.weight)
                delta = md.delta.t() if dim == 0 else md.delta  # [k, out] or [out, k]
                # below float32 the sum is taken in float32 and rounded once, as `s2ft-adapter fuse` does
                wide = view.dtype in (torch.bfloat16, torch.float16)
                # a row-major W: the compiled edits visit each row once (index ops walk strided columns)
                edits = native.columns_ops() if dim == 1 and view.device.type == "cpu" and not wide else None
                plan.append((view, dim, md.index.to(view.device),
                             delta.to(view.device, torch.float32 if wide else view.dtype).contiguous(), edits))
            self._plans[version] = plan
        return plan

    def _add_columns(self, version: AdapterVersion) -> list[torch.Tensor]:
        """`W[:, index] += delta` per module; returns the original columns."""
        saved = []
        self.epoch += 1
        with torch.no_grad():
            for view, dim, index, delta, edits in self._plan(version):
                if edits:
                    saved.append(edits[0](view, index, delta))
                else:
                    saved.append(view.index_select(dim, index))  # a copy of the touched columns
                    view.index_copy_(dim, index, (saved[-1].to(delta.dtype) + delta).to(view.dtype))
        return saved

    def _restore_columns(self, version: AdapterVersion, saved: list[torch.Tensor]) -> None:
        self.epoch += 1
        with torch.no_grad():
            for (view, dim, index, _, edits), original in zip(self._plan(version), saved):
                if edits:
                    edits[1](view, index, original)
                else:
                    view.index_copy_(dim, index, original)

    # ---- reporting -----------------------------------------------------------------------
    @_locked
    def resident(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.version is not None]

"""Automatic fusion policy (no torch): fuse the adapter that dominates recent traffic, unfuse when it fades.

With hysteresis (fuse above `fuse_share`, unfuse below `unfuse_share`) and a minimum number of
requests in the window for either decision, so a short burst (or a quiet spell) does not make the
engine flap.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass


@dataclass
class AutoFuseDecision:
    action: str  # "fuse" | "unfuse"
    adapter: str
    share: float  # the adapter's share of requests in the window
    requests: int  # requests in the window


class AutoFusePolicy:
    def __init__(self, fuse_share: float = 0.6, unfuse_share: float = 0.4, window_s: float = 30.0,
                 min_requests: int = 20):
        if not 0 < unfuse_share <= fuse_share <= 1:
            raise ValueError("auto-fuse needs 0 < unfuse_share <= fuse_share <= 1")
        self.fuse_share, self.unfuse_share = fuse_share, unfuse_share
        self.window_s, self.min_requests = window_s, min_requests
        self._events: deque[tuple[float, str | None]] = deque()
        self._lock = threading.Lock()  # record() runs on request threads, decide() on the engine's

    def record(self, adapter: str | None, now: float | None = None) -> None:
        """One request for `adapter` (None: the base)."""
        with self._lock:
            self._events.append((time.monotonic() if now is None else now, adapter))

    def forget(self, adapter: str) -> None:
        """`adapter` was unloaded: its past requests no longer argue for fusing it."""
        with self._lock:
            self._events = deque(e for e in self._events if e[1] != adapter)

    def decide(self, fused: list[str], now: float | None = None, room: bool = True) -> AutoFuseDecision | None:
        """What to do now: unfuse one of `fused` (the adapters this policy fused) whose share faded, else,
        while none of them is fused and `room` allows another fused adapter, fuse the dominant one."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._events and self._events[0][0] < now - self.window_s:
                self._events.popleft()
            total = len(self._events)
            counts = Counter(name for _, name in self._events)
        if total < self.min_requests:  # too little traffic to judge, either way (an idle window included)
            return None
        for name in fused:  # unfuse first: a fading adapter frees the fusion for the next one
            share = counts.get(name, 0) / total
            if share < self.unfuse_share:
                return AutoFuseDecision("unfuse", name, share, total)
        if fused or not room:
            return None
        top = max((n for n in counts if n is not None), key=counts.__getitem__, default=None)
        if top is not None and counts[top] / total >= self.fuse_share:
            return AutoFuseDecision("fuse", top, counts[top] / total, total)
        return None

"""The engine thread: the one thread that runs an engine's torch work.

PyTorch's CPU build parallelises with GNU OpenMP, which keeps a pool of worker threads for every
thread that has run a parallel region. Once a process holds more such threads than CPUs, every pool
stops spin-waiting and sleeps between regions, so each of the ~300 parallel regions of a decode step
pays a wake-up. On a 2-core machine the same decode step ran 10-40% slower in a thread other than
the one that had loaded the model (`benchmarks/engine_throughput.py` measures the engine as served).

So one thread does it all: it loads the model, installs, fuses and removes adapters, scores, and
runs the step loop once started. Other threads hand it calls (`call`) and wait for the result.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from functools import partial
from typing import Any, Callable


_running: "weakref.WeakSet[EngineThread]" = weakref.WeakSet()
EXIT_WAIT_S = 300.0  # at exit, how long the engine threads' current steps may take to end


@atexit.register
def _stop_at_exit() -> None:
    """A script that ends with requests in flight: stop every engine thread between two steps before the
    interpreter tears down (QA: a daemon thread still inside torch then aborted the process, SIGABRT)."""
    workers = list(_running)
    for worker in workers:  # all asked at once, then awaited to the end of their steps, within one deadline: a
        worker.stop(final=lambda: None, timeout=0)  # 25 s prefill outlived a 10 s wait (SIGABRT again), and a
    deadline = time.monotonic() + EXIT_WAIT_S  # step listener that blocks would hold the exit forever
    for worker in workers:
        worker.stop(final=lambda: None, timeout=max(0.0, deadline - time.monotonic()))


class EngineThread:
    def __init__(self, cond: threading.Condition, name: str = "s2ft-engine"):
        self.cond = cond  # shared with the scheduler: a new call and a new request both wake the thread
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._body: Callable[[], None] | None = None  # one pass of the step loop, once started
        self._stopping = False
        self._final: Callable[[], None] = lambda: None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        _running.add(self)

    def call(self, fn: Callable, *args, **kwargs) -> Any:
        """Run `fn(*args, **kwargs)` on the engine thread and return (or raise) what it did."""
        future: Future = Future()
        with self.cond:  # once stopping, callers run their own calls (the engine is shut down)
            inline = self._stopping or self.current
            if not inline:
                self._calls.append((partial(fn, *args, **kwargs), future))
                self.cond.notify_all()
        return fn(*args, **kwargs) if inline else future.result()

    def run_body(self, body: Callable[[], bool]) -> None:
        """Start running `body` in a loop, between calls, until it returns False."""
        with self.cond:
            self._body = body
            self.cond.notify_all()

    def stop(self, final: Callable[[], None], timeout: float | None = 5.0) -> None:
        """Stop the loop; `final` runs on the engine thread last (after the pending calls)."""
        with self.cond:
            if self._thread.is_alive() and not self._stopping:  # else it ran its final call already
                self._final = final
            self._stopping = True
            self.cond.notify_all()
        if not self.current:  # a finalizer may run on it
            self._thread.join(timeout)

    def wait(self, ready: Callable[[], bool], timeout: float) -> None:
        """In the body: sleep until `ready()`, a call, a stop, or `timeout`, whichever comes first."""
        with self.cond:
            if not (self._calls or self._stopping or ready()):
                self.cond.wait(timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def current(self) -> bool:
        """Whether the calling thread is this one."""
        return threading.current_thread() is self._thread

    @property
    def running(self) -> bool:
        return self._body is not None and self._thread.is_alive()

    def _run_calls(self) -> None:
        while True:
            with self.cond:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed back to the caller, never kills the thread
                future.set_exception(exc)

    def _run(self) -> None:
        while True:
            self._run_calls()
            with self.cond:
                if self._stopping:
                    break
                if self._body is None:
                    if not self._calls:
                        self.cond.wait()
                    continue
                body = self._body
            if not body():  # steps, or waits on `cond` for work (a call wakes it too); False: nothing left
                with self.cond:
                    self._stopping = True
                break
        try:
            self._final()
        finally:  # the calls handed over before the stop still get their answer
            self._run_calls()
            # nothing of the engine stays reachable from here (QA: a shut-down engine was never freed)
            self._final, self._body = (lambda: None), None
            _running.discard(self)

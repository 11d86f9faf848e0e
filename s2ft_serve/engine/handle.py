"""`RequestHandle`: the caller's side of a request; the engine thread pushes StreamEvents into it."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import AsyncIterator, Iterator

from s2ft_serve.engine.request import RequestOutput, StreamEvent


class RequestHandle:
    """Iterate `events()` (sync) or `aevents()` (async); `result()` collects; `cancel()` aborts."""

    def __init__(self, request_id: str, adapter: str | None, prompt_token_ids: list[int]):
        self.request_id = request_id
        self.adapter = adapter
        self.prompt_token_ids = prompt_token_ids
        self._queue: queue.Queue[StreamEvent] = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: asyncio.Queue[StreamEvent] | None = None
        self._seq = None
        self._engine = None  # the engine, kept alive while its handles are (it may be dropped without shutdown)
        self._lock = threading.Lock()  # put() (engine thread) vs attach_loop() (caller): no lost event
        self._text: list[str] = []
        self.finished = False

    def bind(self, seq, engine) -> None:
        self._seq, self._engine = seq, engine

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events to `loop` from now on (events already queued are moved over)."""
        with self._lock:
            self._aqueue = asyncio.Queue()
            self._loop = loop
            while True:
                try:
                    self._aqueue.put_nowait(self._queue.get_nowait())
                except queue.Empty:
                    break

    def put(self, event: StreamEvent) -> None:
        """Called by the engine thread."""
        with self._lock:
            loop = self._loop
            if loop is None:
                self._queue.put(event)
                return
        try:
            loop.call_soon_threadsafe(self._aqueue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the caller is gone
            self.cancel()

    def _record(self, event: StreamEvent) -> None:
        self._text.append(event.text_delta)
        if event.finished:
            self.finished = True

    def events(self, timeout: float | None = None) -> Iterator[StreamEvent]:
        """The request's events as they come. Leaving the iteration early (a `break` out of
        `Engine.stream`, `close()`, or an exception such as Ctrl-C's KeyboardInterrupt while waiting)
        cancels the request, as leaving `aevents` does; a timeout (`queue.Empty`, `timeout` seconds
        without an event) does not: the caller may wait again."""
        self._check_sync()
        try:
            while not self.finished:
                event = self._queue.get(timeout=timeout)
                self._record(event)
                yield event
        except queue.Empty:
            raise
        except BaseException:  # GeneratorExit, KeyboardInterrupt, ...: nobody will read the rest
            if not self.finished:
                self.cancel()
            raise

    def _check_sync(self) -> None:
        """Refuse the blocking readers on a handle whose events go to an event loop: they would never get
        one (QA: `result()` blocked forever, or timed out on a finished request)."""
        if self._aqueue is not None and not self.finished:
            raise RuntimeError("this handle came from asubmit(); use aevents() or aresult()")

    async def aevents(self) -> AsyncIterator[StreamEvent]:
        if self._aqueue is None:  # not an assert: `python -O` would drop it and hang
            raise RuntimeError("this handle came from submit(); use Engine.asubmit for asyncio")
        try:
            while not self.finished:
                event = await self._aqueue.get()
                self._record(event)
                yield event
        finally:
            if not self.finished:  # the consumer went away (client disconnected)
                self.cancel()

    def result(self, timeout: float | None = None) -> RequestOutput:
        """The whole output, once the request ends; TimeoutError if it has not within `timeout` seconds
        (the request goes on: the caller may wait again)."""
        self._check_sync()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                self._record(self._queue.get(timeout=left))
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s") from None
            except BaseException:  # Ctrl-C while waiting: nobody will read the rest
                self.cancel()
                raise
        return self._output()

    async def aresult(self) -> RequestOutput:
        async for _ in self.aevents():
            pass
        return self._output()

    def _output(self) -> RequestOutput:
        seq = self._seq
        return RequestOutput(
            request_id=self.request_id, adapter=self.adapter, prompt_token_ids=self.prompt_token_ids,
            token_ids=list(seq.output_ids), text="".join(self._text), finish_reason=seq.finish_reason,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            prompt_logprobs=seq.prompt_logprobs, cached_tokens=seq.cached_tokens)

    @property
    def prompt_logprobs(self) -> list | None:
        """The prompt tokens' logprobs, if asked for (known once the prompt is prefilled)."""
        return self._seq.prompt_logprobs if self._seq is not None else None

    @property
    def generated_tokens(self) -> int:
        """Tokens generated so far (also those not yet taken from the event queue)."""
        return len(self._seq.output_ids) if self._seq is not None else 0

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (known once the request is admitted)."""
        return self._seq.cached_tokens if self._seq is not None else 0

    def cancel(self) -> None:
        if self._seq is not None:
            self._seq.cancelled = True

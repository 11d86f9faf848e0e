"""The engine thread runs every call handed to it, between passes of the step loop."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.engine.thread import EngineThread
from s2ft_serve.model.testing import random_adapter

from engine_reference import make_engine


def test_calls_run_on_the_engine_thread_and_return_or_raise():
    worker = EngineThread(threading.Condition(), name="t-engine")
    assert worker.call(lambda a, b=0: (threading.current_thread().name, a + b), 2, b=3) == ("t-engine", 5)
    with pytest.raises(KeyError, match="missing"):
        worker.call(lambda: {}["missing"])
    assert worker.call(lambda: "still alive") == "still alive"
    worker.stop(final=lambda: None)


def test_calls_interleave_with_the_body_and_stop_runs_final_last():
    cond = threading.Condition()
    worker = EngineThread(cond, name="t-engine")
    passes, order = [], []

    def body():
        passes.append(1)
        with cond:
            cond.wait(0.01)
        return True

    worker.run_body(body)
    assert worker.running
    worker.call(lambda: order.append("call"))
    for _ in range(500):  # the body runs between calls
        if passes:
            break
        time.sleep(0.01)
    worker.stop(final=lambda: order.append(("final", threading.current_thread().name)))
    assert passes and order == ["call", ("final", "t-engine")]
    assert not worker.running
    assert worker.call(lambda: threading.current_thread().name) == threading.current_thread().name  # inline now


def test_engine_does_its_torch_work_on_its_own_thread(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    seen = []
    install = engine.registry.install
    engine.registry.install = lambda *a, **k: (seen.append(threading.current_thread().name), install(*a, **k))[1]
    engine.add_adapter("a", random_adapter(engine.loaded.model, engine.model_name, seed=1))
    engine.logits(engine.tokenize("hello"), adapter="a")
    assert seen == ["s2ft-engine"]
    engine.start()
    assert engine.generate("hello", "a").token_ids
    engine.shutdown(timeout=5)


def _ends(thread: threading.Thread, engine_ref: weakref.ref) -> bool:
    for _ in range(200):
        gc.collect()
        if engine_ref() is None and not thread.is_alive():
            return True
        time.sleep(0.05)
    return False


def test_an_engine_dropped_without_shutdown_finishes_its_requests_then_is_collected(tiny_llama_dir):
    """QA (P): an engine dropped without shutdown() kept its thread, and through it the model, for the life
    of the process (a notebook that makes engines in a loop runs out of memory)."""
    engine = make_engine(tiny_llama_dir).start()
    handle = engine.submit("fox", None, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    thread, ref = engine._thread._thread, weakref.ref(engine)
    del engine
    gc.collect()
    assert len(handle.result(timeout=60).token_ids) == 40  # its request's handle holds it
    assert ref() is not None and thread.is_alive()
    del handle
    assert _ends(thread, ref)


def test_an_engine_never_started_ends_its_thread_when_dropped(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    thread, ref = engine._thread._thread, weakref.ref(engine)
    del engine
    assert _ends(thread, ref)


def test_an_engine_shut_down_is_collected(tiny_llama_dir):
    """QA: after shutdown() (or a `with` block) the engine thread's last call still held the engine, which a
    finalizer kept reachable: every engine a program made and shut down stayed in memory (1.6 GiB each)."""
    with make_engine(tiny_llama_dir) as engine:
        engine.generate("fox", None, SamplingParams(max_tokens=3, temperature=0))
        thread, ref = engine._thread._thread, weakref.ref(engine)
    del engine
    assert _ends(thread, ref)
    engine = make_engine(tiny_llama_dir).start()
    thread, ref = engine._thread._thread, weakref.ref(engine)
    engine.shutdown()
    engine.shutdown()  # twice: harmless
    del engine
    assert _ends(thread, ref)


def test_a_script_ending_with_requests_in_flight_exits_cleanly(tiny_llama_dir, tmp_path):
    """QA: the daemon engine thread was still inside torch as the interpreter tore down: SIGABRT (exit 134)."""
    import subprocess
    import sys

    script = tmp_path / "inflight.py"
    script.write_text(
        "from s2ft_serve.config import EngineConfig\n"
        "from s2ft_serve.engine.engine import Engine\n"
        "from s2ft_serve.engine.request import SamplingParams\n"
        f"e = Engine(EngineConfig(model={str(tiny_llama_dir)!r}, device='cpu', max_batch_size=4)).start()\n"
        "hs = [e.submit([5, 6, 7], None, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))"
        " for _ in range(3)]\n"
        "hs[0].events().__next__()\n"  # running
        "print('exiting', flush=True)\n")
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "exiting" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_shutdown_from_a_step_listener_aborts_at_once(tiny_llama_dir):
    """QA: shutdown() on the engine thread waited its whole timeout for requests only that thread could
    finish (nothing stepped meanwhile), then aborted them."""
    engine = make_engine(tiny_llama_dir).start()
    calls = []

    def listener(batch, tokens):
        if not calls:
            calls.append(1)
            engine.shutdown(timeout=60)

    engine.add_step_listener(listener)
    out = engine.submit("fox", None, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)).result(timeout=20)
    assert out.finish_reason == "abort" and calls == [1]


def test_an_engine_whose_thread_stopped_refuses_requests(tiny_llama_dir):
    """QA: once the exit hook had stopped the engine thread, a request (from an atexit callback that ran
    after it) was queued and never answered."""
    from s2ft_serve.errors import EngineNotReadyError

    engine = make_engine(tiny_llama_dir).start()
    engine._thread.stop(final=lambda: None, timeout=5)  # as the exit hook stops it (the hook stops them all)
    with pytest.raises(EngineNotReadyError, match="shutting down"):
        engine.submit("fox", None, SamplingParams(max_tokens=2))

"""Loading, validation, replacement, removal, lazy loading and LRU eviction of adapters."""

from __future__ import annotations

import os
import threading

import pytest

from s2ft_serve.adapters.format import save_adapter
from s2ft_serve.engine.request import SamplingParams
from s2ft_serve.errors import (AdapterNotFoundError, AdapterValidationError, ConflictError,
                               PermissionDeniedError)
from s2ft_serve.model.testing import random_adapter

from engine_reference import make_engine, reference, reference_greedy

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture
def root(tmp_path, engine):
    """An adapter root with three adapters saved as folders."""
    for i in range(3):
        save_adapter(random_adapter(engine.loaded.model, engine.model_name, seed=40 + i,
                                    fingerprint=engine.fingerprint), tmp_path / f"r{i}")
    return tmp_path


def greedy(model_dir, adapter, engine, prompt="fox"):
    return reference_greedy(reference(model_dir, *([(adapter, 1.0)] if adapter else [])),
                            engine.tokenize(prompt), GREEDY.max_tokens)


def test_load_from_folder_and_conflicts(engine, root):
    info = engine.load_adapter("r0", str(root / "r0"))
    assert info.resident and info.modules == 4 and info.per_layer["0"]["heads"] == 1
    assert info.config["selection"]["seed"] == 40
    with pytest.raises(ConflictError):
        engine.load_adapter("r0", str(root / "r1"))
    engine.load_adapter("r0", str(root / "r1"), replace=True)
    assert engine.get_adapter("r0").config["selection"]["seed"] == 41


def test_bad_adapter_leaves_the_engine_unchanged(engine, adapters, root, tiny_model_dir):
    before = engine.generate("fox", "a0", GREEDY).token_ids
    bad = root / "r2"
    (bad / "adapter_config.json").write_text('{"adapter_type": "lora"}')
    with pytest.raises(AdapterValidationError, match="adapter_type"):
        engine.load_adapter("a0", str(bad), replace=True)
    with pytest.raises(AdapterValidationError):
        engine.load_adapter("new", str(bad))
    assert not engine.has_adapter("new")
    assert engine.generate("fox", "a0", GREEDY).token_ids == before


def test_a_delta_beyond_the_serving_dtype_is_refused(engine, adapters, root):
    """A float64 delta of 1e39 is finite as stored but inf in the float32 model: refused by name,
    and the engine serves what it served before."""
    from safetensors.torch import load_file, save_file

    before = engine.generate("fox", "a0", GREEDY).token_ids
    weights = root / "r2" / "adapter_model.safetensors"
    tensors = {k: v.double() if v.is_floating_point() else v for k, v in load_file(weights).items()}
    key = next(k for k in tensors if k.endswith(".s2ft_delta"))
    tensors[key][0, 0] = 1e39
    save_file(tensors, weights)
    with pytest.raises(AdapterValidationError, match=f"{key}.*finite in float32"):
        engine.load_adapter("a0", str(root / "r2"), replace=True)
    assert engine.generate("fox", "a0", GREEDY).token_ids == before
    tensors[key][0, 0] = 1e38
    save_file(tensors, weights)
    engine.load_adapter("r2", str(root / "r2"))  # within float32's range: served


def test_fingerprint_mismatch_is_refused(engine, root):
    import json
    cfg = root / "r0" / "adapter_config.json"
    data = json.loads(cfg.read_text())
    data["base_model_fingerprint"] = "sha256:0000"
    cfg.write_text(json.dumps(data))
    with pytest.raises(AdapterValidationError, match="fingerprint"):
        engine.load_adapter("r0", str(root / "r0"))


def test_replace_in_flight_keeps_old_weights_for_old_requests(engine, adapters, tiny_model_dir):
    old = engine.submit("fox", "a0", GREEDY)  # queued, pinned to the old version (engine not started)
    engine.add_adapter("a0", adapters["a1"], replace=True)
    new = engine.submit("fox", "a0", GREEDY)
    engine.start()
    assert old.result(timeout=60).token_ids == greedy(tiny_model_dir, adapters["a0"], engine)
    assert new.result(timeout=60).token_ids == greedy(tiny_model_dir, adapters["a1"], engine)
    engine.shutdown()
    live_slots = {e.version.slot for e in engine.registry.entries.values()}
    for layer in engine.runner.layers.values():  # nothing stale: only live versions hold columns
        held = {s for s, k in enumerate(layer.slots.slot_k) if k}
        assert held <= live_slots


def test_remove_finishes_in_flight_then_404(engine, adapters, tiny_model_dir):
    pending = engine.submit("fox", "a2", GREEDY)
    engine.remove_adapter("a2")
    with pytest.raises(AdapterNotFoundError):
        engine.submit("fox", "a2", GREEDY)
    engine.start()
    assert pending.result(timeout=60).token_ids == greedy(tiny_model_dir, adapters["a2"], engine)


def test_lazy_load_and_root_confinement(tiny_model_dir, root, tmp_path_factory):
    engine = make_engine(tiny_model_dir, adapter_root=str(root))
    engine.start()
    assert not engine.has_adapter("r1")
    out = engine.generate("fox", "r1", GREEDY)
    assert engine.has_adapter("r1") and out.num_generated_tokens == 8
    outside = tmp_path_factory.mktemp("outside")
    save_adapter(random_adapter(engine.loaded.model, engine.model_name, seed=1), outside / "x")
    with pytest.raises(PermissionDeniedError):
        engine.load_adapter("x", str(outside / "x"))
    os.symlink(outside / "x", root / "link")
    with pytest.raises(PermissionDeniedError):
        engine.load_adapter("link", str(root / "link"))
    with pytest.raises(PermissionDeniedError):  # a lazy load follows the link and refuses too
        engine.generate("fox", "link", GREEDY)
    with pytest.raises(AdapterNotFoundError):
        engine.generate("fox", "../x", GREEDY)
    # QA: a folder inside the root whose files link out of it was read (only the folder was checked)
    for linked in ("adapter_model.safetensors", "adapter_config.json"):
        inner = root / f"inner-{linked.split('.')[0]}"
        save_adapter(random_adapter(engine.loaded.model, engine.model_name, seed=2), inner)
        (inner / linked).unlink()
        os.symlink(outside / "x" / linked, inner / linked)
        with pytest.raises(PermissionDeniedError, match=f"{linked} links outside"):
            engine.load_adapter("inner", str(inner))
        with pytest.raises(PermissionDeniedError):
            engine.generate("fox", inner.name, GREEDY)
    inner = root / "inner-ok"  # a file linked to another inside the root is fine
    save_adapter(random_adapter(engine.loaded.model, engine.model_name, seed=2), inner)
    (inner / "adapter_model.safetensors").rename(root / "weights.safetensors")
    os.symlink(root / "weights.safetensors", inner / "adapter_model.safetensors")
    assert engine.load_adapter("inner", str(inner)).name == "inner"
    lazy_off = make_engine(tiny_model_dir, adapter_root=str(root), lazy_load=False)
    with pytest.raises(AdapterNotFoundError):
        lazy_off.submit("fox", "r2")
    engine.shutdown()


def test_a_request_loading_a_broken_adapter_is_told_its_name_not_the_servers_folders(tiny_model_dir, root):
    """QA: a user's request naming a broken adapter under the root got the server's absolute file path."""
    engine = make_engine(tiny_model_dir, adapter_root=str(root))
    save_adapter(random_adapter(engine.loaded.model, engine.model_name, seed=3), root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterValidationError) as refused:
        engine.submit("fox", "broken", GREEDY)
    assert str(root) not in refused.value.message and "adapter 'broken'" in refused.value.message
    assert "not a readable safetensors" in refused.value.message
    with pytest.raises(AdapterValidationError, match=str(root)):  # the admin loading it by path sees where
        engine.load_adapter("broken", str(root / "broken"))
    engine.shutdown()


def test_lazy_load_under_a_relative_root(tiny_model_dir, root, monkeypatch):
    """`--adapter-root ./adapters` (as the README writes it): a request naming a folder under it loads
    it (QA: the root was joined twice, adapters/adapters/NAME, and every lazy load failed with 422)."""
    monkeypatch.chdir(root.parent)
    engine = make_engine(tiny_model_dir, adapter_root=f"./{root.name}")
    engine.start()
    out = engine.generate("fox", "r1", GREEDY)
    assert engine.has_adapter("r1") and out.num_generated_tokens == 8
    assert engine.get_adapter("r1").path == str((root / "r1").resolve())
    engine.shutdown()


def test_replacing_an_adapter_evicts_no_other(tiny_model_dir, root):
    """QA: the new version was counted beside the old one it replaces, so another adapter was evicted."""
    engine = make_engine(tiny_model_dir, adapter_root=str(root), max_resident_adapters=2)
    engine.load_adapter("r0", str(root / "r0"))
    engine.load_adapter("r1", str(root / "r1"))
    engine.load_adapter("r0", str(root / "r2"), replace=True)
    assert {a.name: a.resident for a in engine.list_adapters()} == {"r0": True, "r1": True}
    engine.shutdown()


def test_lru_eviction_and_transparent_reload(tiny_model_dir, root):
    engine = make_engine(tiny_model_dir, adapter_root=str(root), max_resident_adapters=2)
    engine.start()
    for i in range(3):
        engine.load_adapter(f"r{i}", str(root / f"r{i}"))
    resident = {a.name: a.resident for a in engine.list_adapters()}
    assert resident == {"r0": False, "r1": True, "r2": True}
    from s2ft_serve.adapters.format import load_adapter
    r0 = load_adapter(root / "r0")
    assert engine.generate("fox", "r0", GREEDY).token_ids == greedy(tiny_model_dir, r0, engine)
    resident = {a.name: a.resident for a in engine.list_adapters()}
    assert resident["r0"] and sum(resident.values()) == 2
    engine.shutdown()


def unload_during_reload(engine, monkeypatch, name: str, request) -> threading.Thread:
    """Run `request` in a thread; unload `name` while it re-reads the adapter's files; return the thread."""
    read, reading, go_on = engine._read, threading.Event(), threading.Event()

    def slow_read(path):
        reading.set()
        go_on.wait(10)
        return read(path)

    monkeypatch.setattr(engine, "_read", slow_read)
    thread = threading.Thread(target=request)
    thread.start()
    assert reading.wait(10)
    engine.remove_adapter(name)
    go_on.set()
    thread.join(30)
    return thread


@pytest.mark.parametrize("lazy", [False, True])
def test_an_unload_during_the_reload_of_an_evicted_adapter_stays_unloaded(tiny_model_dir, root, monkeypatch, lazy):
    """QA: a DELETE that landed while a request re-read an evicted adapter's files was undone: the
    reload registered the adapter again (even with lazy loading off). Lazy loading from another
    folder under the name (there is no <root>/a) does not bring it back either."""
    engine = make_engine(tiny_model_dir, adapter_root=str(root), lazy_load=lazy, max_resident_adapters=1).start()
    engine.load_adapter("a", "r0")
    engine.load_adapter("b", "r1")  # evicts a
    failure = []
    unload_during_reload(engine, monkeypatch, "a", lambda: failure.append(
        pytest.raises(AdapterNotFoundError, engine.generate, "fox", "a", GREEDY)))
    assert failure and not engine.has_adapter("a")
    with pytest.raises(AdapterNotFoundError):
        engine.generate("fox", "a", GREEDY)
    engine.shutdown()


def test_an_unload_during_a_reload_that_lazy_loading_would_redo_serves_the_request(tiny_model_dir, root,
                                                                                   monkeypatch):
    """QA (soak): with lazy loading, a request reloading an evicted adapter that was unloaded meanwhile
    got a 404 model_not_found, though any request arriving after the unload loads it again."""
    engine = make_engine(tiny_model_dir, adapter_root=str(root), max_resident_adapters=1).start()
    engine.load_adapter("r0", "r0")
    engine.load_adapter("r1", "r1")  # evicts r0
    out = []
    unload_during_reload(engine, monkeypatch, "r0", lambda: out.append(engine.generate("fox", "r0", GREEDY)))
    assert out and out[0].finish_reason == "length" and engine.has_adapter("r0")
    engine.shutdown()


def test_a_burst_over_the_resident_limit_is_evicted_once_idle(engine, tiny_model_dir, root):
    """Requests in flight pin their adapters, so a burst over more adapters than `max_resident_adapters`
    overshoots the limit; as they finish, the least recently used idle ones are evicted until the limit
    holds again (not only at the next load), and every answer was right."""
    for i in range(3, 6):
        save_adapter(random_adapter(engine.loaded.model, engine.model_name, seed=40 + i), root / f"r{i}")
    engine = make_engine(tiny_model_dir, adapter_root=str(root), max_resident_adapters=2)
    names = [f"r{i}" for i in range(6)]
    handles = engine.submit_many([("fox", name, GREEDY) for name in names])  # lazily loaded, all pinned at once
    assert sum(a.resident for a in engine.list_adapters()) == 6
    engine.start()
    outs = [h.result(timeout=60) for h in handles]
    assert sum(a.resident for a in engine.list_adapters()) == 2
    from s2ft_serve.adapters.format import load_adapter
    for name, out in zip(names, outs):
        assert out.token_ids == greedy(tiny_model_dir, load_adapter(root / name), engine)
    engine.shutdown()


def test_the_base_models_name_is_not_an_adapter_name(engine, adapters):
    with pytest.raises(ConflictError, match="base model's name"):
        engine.add_adapter(engine.model_name, adapters["a0"])


def test_adapter_files_are_read_and_validated_outside_the_engine_thread(tmp_path, tiny_llama_dir, monkeypatch):
    """A load reads, parses and validates its files in the calling thread (a slow disk or a large
    adapter must not stall the running batch); only installing runs on the engine thread."""
    import threading

    import s2ft_serve.engine.engine as engine_module

    readers, parsers = [], []
    read, parse = engine_module.read_adapter_file, engine_module.parse_adapter

    def spy_read(*args, **kwargs):
        readers.append(threading.current_thread().name)
        return read(*args, **kwargs)

    def spy_parse(*args, **kwargs):
        parsers.append(threading.current_thread().name)
        return parse(*args, **kwargs)

    monkeypatch.setattr(engine_module, "read_adapter_file", spy_read)
    monkeypatch.setattr(engine_module, "parse_adapter", spy_parse)
    engine = make_engine(tiny_llama_dir, adapter_root=str(tmp_path), max_resident_adapters=1).start()
    try:
        for name, seed in (("r0", 1), ("lazy", 2)):
            save_adapter(random_adapter(engine.loaded.model, engine.model_name, seed=seed), tmp_path / name)
        engine.load_adapter("r0", "r0")  # admin load
        engine.generate("fox", "lazy", GREEDY)  # lazy load (evicts r0: one resident adapter)
        engine.generate("fox", "r0", GREEDY)  # reload after eviction
        assert len(readers) == 3 and "s2ft-engine" not in readers
        assert len(parsers) == 3 and "s2ft-engine" not in parsers
        assert engine.get_adapter("r0").resident
    finally:
        engine.shutdown(timeout=5)


def test_a_reload_after_eviction_refuses_files_changed_since(tiny_model_dir, root):
    """QA: an evicted adapter came back from whatever its folder held by then: other answers under the same
    name, with the old size, config and memory accounting."""
    engine = make_engine(tiny_model_dir, adapter_root=str(root), max_resident_adapters=1).start()
    engine.load_adapter("r0", "r0")
    before = engine.get_adapter("r0")
    engine.load_adapter("r1", "r1")  # evicts r0
    assert not engine.get_adapter("r0").resident
    other = random_adapter(engine.loaded.model, engine.model_name, seed=99, channels=30, fingerprint=engine.fingerprint)
    save_adapter(other, root / "r0")
    with pytest.raises(ConflictError, match="'r0' changed on disk since it was loaded.*replace"):
        engine.generate("fox", "r0", GREEDY)
    after = engine.get_adapter("r0")
    assert not after.resident and after.nbytes == before.nbytes and after.config == before.config
    info = engine.load_adapter("r0", "r0", replace=True)  # the new files, on purpose
    assert info.nbytes == (root / "r0" / "adapter_model.safetensors").stat().st_size != before.nbytes
    assert engine.generate("fox", "r0", GREEDY).token_ids == greedy(tiny_model_dir, other, engine)
    engine.shutdown()


@pytest.mark.parametrize("config, reason", [
    ({}, "adapter_type must be"),
    ({"adapter_type": "lora", "format_version": 2}, "adapter_type must be"),
    ({"format_version": 2}, "format_version must be 1"),
    ({"target_modules": ["o_proj"]}, "not among the config's target_modules"),
    (None, "must hold a JSON object"),
    ({"stats": {"lr": float("nan")}}, "stats.lr: numbers must be finite"),
    ({"blob": b"raw"}, "blob: not a JSON value"),
])
def test_an_adapter_added_from_memory_has_its_config_checked_as_a_files(engine, config, reason):
    """QA: add_adapter checked the tensors only ({} or adapter_type "lora" were served and shown)."""
    from s2ft_serve.adapters.format import Adapter

    adapter = random_adapter(engine.loaded.model, engine.model_name, seed=5)
    if config is not None and "adapter_type" not in config and config:
        config = {**adapter.config, **config}
    with pytest.raises(AdapterValidationError, match=reason):
        engine.add_adapter("x", Adapter(config=config, modules=adapter.modules))
    assert not engine.has_adapter("x")


def test_an_adapter_added_from_memory_is_copied_and_measured(tiny_model_dir):
    """QA: the caller's tensors were kept, so changing them afterwards changed what fusion wrote (NaN logits
    for every request); the caller's nbytes was believed (nbytes=1 passed the memory limits) and
    max_adapter_bytes never applied."""
    import torch

    from s2ft_serve.adapters.format import Adapter, ModuleDelta

    engine = make_engine(tiny_model_dir, max_adapter_bytes=20_000).start()
    adapter = random_adapter(engine.loaded.model, engine.model_name, seed=5)
    adapter.config["stats"] = {"steps": 3}
    kept = {n: (md.index.clone(), md.delta.clone()) for n, md in adapter.modules.items()}
    expected = sum(md.index.numel() * 8 + md.delta.numel() * 4 for md in adapter.modules.values())
    adapter.nbytes = 1
    assert engine.add_adapter("x", adapter).nbytes == expected
    for md in adapter.modules.values():  # the caller reuses its buffers
        md.delta.fill_(float("nan"))
        md.index.zero_()
    engine.fuse("x")
    original = Adapter(adapter.config, {n: ModuleDelta(i, d) for n, (i, d) in kept.items()})
    assert engine.generate("fox", "x", GREEDY).token_ids == greedy(tiny_model_dir, original, engine)
    assert torch.isfinite(engine.logits(engine.tokenize("fox"))).all()
    big = random_adapter(engine.loaded.model, engine.model_name, seed=6, channels=100)
    with pytest.raises(AdapterValidationError, match="exceeds the limit of 20000 bytes"):
        engine.add_adapter("big", big)
    adapter.config["stats"]["steps"] = -1  # nor the config's
    assert engine.get_adapter("x").config["stats"] == {"steps": 3}
    bad = Adapter(adapter.config, {n: ModuleDelta(i.tolist(), d) for n, (i, d) in kept.items()})
    with pytest.raises(AdapterValidationError, match="must be a torch.Tensor, got list"):
        engine.add_adapter("bad", bad)
    engine.shutdown()


def test_slot_tables_shrink_when_their_widest_adapter_leaves(engine):
    """Every slot is padded to the widest adapter's columns: one wide adapter, unloaded, kept every table
    that wide for good (SmolLM2: one all-channel down_proj adapter beside 63 of 40 channels, ~6.8 GB of
    tables instead of ~0.2 GB)."""
    import torch

    small = random_adapter(engine.loaded.model, engine.model_name, seed=1, channels=4)
    wide = random_adapter(engine.loaded.model, engine.model_name, seed=2, channels=100)
    engine.add_adapter("small", small)
    ids = engine.tokenize("Hello world")
    before = engine.logits(ids, "small")
    down = next(layer for name, layer in engine.runner.layers.items() if name.endswith("down_proj"))
    narrow_rows = down.slots.table.shape[0]
    engine.add_adapter("wide", wide)
    assert down.slots.k_cap == 100
    engine.remove_adapter("wide")
    assert down.slots.k_cap == 4 and down.slots.table.shape[0] == narrow_rows
    assert torch.equal(engine.logits(ids, "small"), before)


def test_a_merge_refused_for_its_request_loads_and_evicts_nothing(tiny_model_dir, root):
    """QA: a merge refused for an infinite weight or a taken name had already loaded its sources from
    disk, evicting the adapters in memory."""
    from s2ft_serve.errors import InvalidRequestError

    engine = make_engine(tiny_model_dir, adapter_root=str(root), max_resident_adapters=2)
    for i in range(3):
        engine.load_adapter(f"r{i}", f"r{i}")
    before = {a.name: a.resident for a in engine.list_adapters()}
    assert before == {"r0": False, "r1": True, "r2": True}  # a merge of r0 reads it again, evicting r1
    for sources, name, error in (([("r0", float("inf"))], "m", InvalidRequestError),
                                 ([("r0", True)], "m", InvalidRequestError),
                                 ([("r0", "2")], "m", InvalidRequestError),
                                 ([(None, 1.0)], "m", InvalidRequestError),
                                 ([("r0", 1.0)], "r2", ConflictError),
                                 ([("r0", 1.0)], engine.model_name, ConflictError)):
        with pytest.raises(error):
            engine.merge(name, sources)
        assert {a.name: a.resident for a in engine.list_adapters()} == before
    engine.shutdown()


def test_adapters_never_evicted_bound_the_others(tiny_model_dir, root):
    """Adapters held in memory must fit the bounds beside every adapter never evicted, the fused ones
    too (QA: those were not counted); a folder's adapter is still served, over the bounds, then evicted."""
    engine = make_engine(tiny_model_dir, adapter_root=str(root), max_resident_adapters=2)
    engine.add_adapter("m", random_adapter(engine.loaded.model, engine.model_name, seed=70))
    engine.load_adapter("r0", "r0")
    engine.fuse("r0")
    with pytest.raises(ConflictError, match="never evicted"):
        engine.add_adapter("m2", random_adapter(engine.loaded.model, engine.model_name, seed=71))
    assert not engine.has_adapter("m2")
    engine.start()
    assert engine.generate("fox", "r1", GREEDY).finish_reason == "length"  # lazily loaded, over the bounds
    assert {a.name: a.resident for a in engine.list_adapters()} == {"m": True, "r0": True, "r1": False}
    engine.shutdown()


def test_a_fuse_that_would_exceed_the_bounds_of_adapters_never_evicted_is_refused(tiny_model_dir, root):
    """QA: fusing skipped the bounds that adapters never evicted must fit (with two merges in memory
    and at most two resident, a third adapter fused made three resident for good); a refused fuse changes
    nothing, and one that fits beside the others goes through."""
    engine = make_engine(tiny_model_dir, adapter_root=str(root), max_resident_adapters=2, max_fused_adapters=2)
    engine.add_adapter("m", random_adapter(engine.loaded.model, engine.model_name, seed=72))
    engine.load_adapter("r0", "r0")
    engine.fuse("m")  # held in memory already: fusing it adds nothing never evicted
    engine.fuse("r0")  # 2 of 2
    engine.unfuse("r0")
    engine.add_adapter("m2", random_adapter(engine.loaded.model, engine.model_name, seed=73))
    before = {a.name: (a.resident, a.fused) for a in engine.list_adapters()}
    with pytest.raises(ConflictError, match="fusing 'r0'"):
        engine.fuse("r0")
    assert {a.name: (a.resident, a.fused) for a in engine.list_adapters()} == before
    assert len(engine.registry.fused) == 1
    engine.fuse("m2")  # in memory: fits as before
    engine.shutdown()


def test_merge_sources_and_names_checked_before_reading(tiny_model_dir, root):
    """QA: a merge into the name of a folder under the adapter root read its sources (evicting others)
    and would have hidden that folder; a missing source was found only after the others were read; numpy
    and torch weights were refused, a huge int or a 3-tuple raised what they raised, a generator was used up."""
    import numpy as np
    import torch

    from s2ft_serve.errors import AdapterNotFoundError, InvalidRequestError

    engine = make_engine(tiny_model_dir, adapter_root=str(root), max_resident_adapters=2)
    for i in range(3):
        engine.load_adapter(f"r{i}", f"r{i}")
    engine.remove_adapter("r2")  # a folder under the root, not loaded
    before = {a.name: a.resident for a in engine.list_adapters()}
    with pytest.raises(ConflictError, match="adapter folder"):
        engine.merge("r2", [("r0", 1.0)])
    with pytest.raises(AdapterNotFoundError):
        engine.merge("m", [("r0", 1.0), ("nope", 1.0)])
    for bad in ([("r0", 10**400)], [("r0", 1.0, 2.0)], [("r0", np.bool_(True))], None, 5, {"r0": 1.0},
                [("r0", torch.empty(1, device="meta"))]):
        with pytest.raises(InvalidRequestError):
            engine.merge("m", bad)
    assert {a.name: a.resident for a in engine.list_adapters()} == before
    info = engine.merge("m", ((name, w) for name, w in [("r0", np.float32(0.5)), ("r1", torch.tensor(2))]))
    assert info.config["merged_from"] == [{"name": "r0", "weight": 0.5}, {"name": "r1", "weight": 2.0}]
    engine.shutdown()

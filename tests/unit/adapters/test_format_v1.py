"""Adapter format v1: round trip, and every validation failure names the file, tensor and reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from s2ft_serve.adapters.format import load_adapter, save_adapter
from s2ft_serve.errors import AdapterValidationError
from s2ft_serve.model.loading import load_model, target_linears
from s2ft_serve.adapters.format import linear_shapes
from s2ft_serve.model.testing import random_adapter

O = "model.layers.0.self_attn.o_proj"
D = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.fixture
def folder(tmp_path, base):
    adapter = random_adapter(base.model, base.name, seed=1, fingerprint=base.fingerprint)
    adapter.config["training"] = {"steps": 3}
    return save_adapter(adapter, tmp_path / "ad")


def shapes(base):
    return linear_shapes(target_linears(base.model))


def test_round_trip_keeps_config_and_tensors(folder, base):
    loaded = load_adapter(folder, shapes(base), base.fingerprint)
    again = load_adapter(save_adapter(loaded, folder.parent / "copy"), shapes(base))
    assert loaded.config["training"] == {"steps": 3} and again.config == loaded.config
    for name, md in loaded.modules.items():
        assert torch.equal(md.index, again.modules[name].index)
        assert torch.equal(md.delta, again.modules[name].delta)
    assert loaded.nbytes == (folder / "adapter_model.safetensors").stat().st_size


def rewrite(folder, mutate):
    from safetensors.torch import load_file
    tensors = load_file(folder / "adapter_model.safetensors")
    mutate(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


@pytest.mark.parametrize("mutate, tensor, reason", [
    (lambda t: t.__setitem__(f"{O}.s2ft_index", t[f"{O}.s2ft_index"].int()), f"{O}.s2ft_index", "int64"),
    (lambda t: t.__setitem__(f"{O}.s2ft_index", t[f"{O}.s2ft_index"] + 1000), f"{O}.s2ft_index", "indices must lie"),
    (lambda t: t.__setitem__(f"{O}.s2ft_index", torch.zeros_like(t[f"{O}.s2ft_index"])), f"{O}.s2ft_index", "distinct"),
    (lambda t: t.__setitem__(f"{D}.s2ft_delta", t[f"{D}.s2ft_delta"][:, :2].contiguous()), f"{D}.s2ft_delta", "shape"),
    (lambda t: t.__setitem__(f"{D}.s2ft_delta", t[f"{D}.s2ft_delta"][:5].contiguous()), f"{D}.s2ft_delta", "out_features"),
    (lambda t: t[f"{D}.s2ft_delta"].__setitem__((0, 0), float("nan")), f"{D}.s2ft_delta", "finite"),
    (lambda t: t.__setitem__(f"{D}.s2ft_delta", t[f"{D}.s2ft_delta"].to(torch.int32)), f"{D}.s2ft_delta", "floating"),
    (lambda t: t.pop(f"{D}.s2ft_delta"), f"{D}.s2ft_index", "no matching"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.s2ft_index", torch.tensor([0])), "q_proj", "not an adaptable"),
    (lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight", torch.zeros(1)), "down_proj.weight", "unexpected tensor name"),
])
def test_invalid_tensors_are_refused(folder, base, mutate, tensor, reason):
    rewrite(folder, mutate)
    with pytest.raises(AdapterValidationError) as err:
        load_adapter(folder, shapes(base))
    message = str(err.value)
    assert "adapter_model.safetensors" in message and tensor in message and reason in message


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_delta_values_are_checked_in_every_float_dtype(folder, base, dtype, bad):
    """Finite values load in any float dtype; one NaN or inf anywhere is refused (the checks run in numpy,
    bfloat16 through its bits)."""
    def mutate(t):
        delta = t[f"{D}.s2ft_delta"].to(dtype)
        if bad is not None:
            delta[-1, -1] = bad
        t[f"{D}.s2ft_delta"] = delta
    rewrite(folder, mutate)
    if bad is None:
        assert load_adapter(folder, shapes(base)).modules[D].delta.dtype == dtype
        return
    with pytest.raises(AdapterValidationError, match=f"{D}.s2ft_delta.*finite"):
        load_adapter(folder, shapes(base))


F32_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize("stored, served, value", [
    (torch.float64, torch.float32, 1e39), (torch.float64, torch.float32, F32_MAX),
    (torch.float64, torch.float32, 3.4028235e38 * (1 + 2 ** -25)),  # rounds to float32's largest, or past it
    (torch.float32, torch.float16, 65519.0), (torch.float32, torch.float16, 65520.0),  # the tie goes to inf
    (torch.float64, torch.float16, 70000.0), (torch.bfloat16, torch.float16, 70000.0),
    (torch.float32, torch.bfloat16, float.fromhex("0x1.fefffep+127")),  # rounds down to bfloat16's largest
    (torch.float32, torch.bfloat16, float.fromhex("0x1.ffp+127")),  # half a step past it: the tie goes to inf
    (torch.float64, torch.bfloat16, 1e39),
    (torch.float16, torch.float32, 65504.0), (torch.bfloat16, torch.float32, 3.3895e38),
])
def test_deltas_must_stay_finite_in_the_serving_dtype(folder, base, stored, served, value):
    """A value finite as stored but past the range of the dtype the model is served in (a float64 1e39
    under a float32 model) would serve as inf: it is refused exactly when the engine's own conversion
    gives inf, with the tensor and the dtype named."""
    from s2ft_serve.adapters.format import parse_adapter, read_adapter_file

    def mutate(t):
        delta = t[f"{D}.s2ft_delta"].to(stored)
        delta[0, -1] = value
        t[f"{D}.s2ft_delta"] = delta
    rewrite(folder, mutate)
    assert load_adapter(folder, shapes(base)).modules[D].delta.dtype == stored  # finite as stored
    served_value = torch.tensor([value], dtype=torch.float64).to(stored).to(served)
    if bool(torch.isfinite(served_value).all()):
        assert parse_adapter(read_adapter_file(folder), shapes(base), served).modules[D].delta[0, -1] == \
            torch.tensor(value, dtype=torch.float64).to(stored)
    else:
        name = str(served).replace("torch.", "")
        with pytest.raises(AdapterValidationError, match=f"{D}.s2ft_delta.*finite in {name}"):
            parse_adapter(read_adapter_file(folder), shapes(base), served)


def test_negative_indices_are_refused(folder, base):
    rewrite(folder, lambda t: t[f"{O}.s2ft_index"].__setitem__(0, -1))
    with pytest.raises(AdapterValidationError, match=r"indices must lie in \[0, \d+\), found -1"):
        load_adapter(folder, shapes(base))


@pytest.mark.parametrize("config, reason", [
    ({"adapter_type": "lora", "format_version": 1, "base_model": "x", "target_modules": []}, "adapter_type"),
    ({"adapter_type": "s2ft", "format_version": 2, "base_model": "x", "target_modules": []}, "format_version"),
    ({"adapter_type": "s2ft", "format_version": 1, "target_modules": []}, "base_model"),
    ({"adapter_type": "s2ft", "format_version": 1, "base_model": "x", "target_modules": "o_proj"}, "target_modules"),
])
def test_invalid_configs_are_refused(folder, base, config, reason):
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterValidationError, match=reason):
        load_adapter(folder, shapes(base))


def test_missing_files_pickle_size_and_fingerprint(folder, base):
    with pytest.raises(AdapterValidationError, match="exceeds the limit"):
        load_adapter(folder, shapes(base), max_bytes=100)
    with pytest.raises(AdapterValidationError, match="does not match"):
        load_adapter(folder, shapes(base), base_fingerprint="sha256:other")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(AdapterValidationError, match="pickle files are never loaded"):
        load_adapter(folder, shapes(base))
    (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterValidationError, match="not a readable safetensors"):
        load_adapter(folder, shapes(base))
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterValidationError, match="not valid JSON"):
        load_adapter(folder, shapes(base))
    with pytest.raises(AdapterValidationError, match="no such directory"):
        load_adapter(folder / "nope", shapes(base))


def test_a_config_file_beyond_its_size_limit_is_refused_unread(folder, base, monkeypatch):
    """QA: adapter_config.json was read whole whatever its size (a 500 MB file, or a link to /dev/zero)."""
    from s2ft_serve.adapters import format as fmt

    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "notes": "x" * 200}))
    assert load_adapter(folder, shapes(base)).config["notes"] == "x" * 200
    monkeypatch.setattr(fmt, "MAX_CONFIG_BYTES", 100)
    monkeypatch.setattr(type(folder / "adapter_config.json"), "read_text",
                        lambda self, *a, **k: pytest.fail("the oversized config was read"))
    with pytest.raises(AdapterValidationError, match="larger than 100 bytes"):
        load_adapter(folder, shapes(base))


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_format_version_must_be_the_integer_1(folder, base, version):
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "format_version": version}))
    with pytest.raises(AdapterValidationError, match="format_version must be 1"):
        load_adapter(folder, shapes(base))


def test_tensors_must_belong_to_the_configs_target_modules(folder, base):
    """An adapter whose config lists only o_proj but whose file holds down_proj tensors contradicts
    itself: refused, naming the module; listing full module names works as well as kinds."""
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["o_proj"]}))
    with pytest.raises(AdapterValidationError, match=r"down_proj.s2ft_delta.*not among the config.s target_modules"):
        load_adapter(folder, shapes(base))
    full = [O, D, "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    (folder / "adapter_config.json").write_text(json.dumps({**config, "target_modules": full}))
    assert set(load_adapter(folder, shapes(base)).modules) <= set(full)


def test_an_unreadable_config_is_a_validation_error(folder, base, monkeypatch):
    """QA: a config the process may not read raised a bare PermissionError (HTTP 500, not 422)."""
    import pathlib

    read_text = pathlib.Path.read_text

    def refuse(self, *args, **kwargs):
        if self.name == "adapter_config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", refuse)
    with pytest.raises(AdapterValidationError, match=r"adapter_config.json: not readable \(.*Permission denied"):
        load_adapter(folder, shapes(base))


@pytest.mark.parametrize("text, reason", [
    ('"x": ' + "[" * 100_000 + "]" * 100_000, r"not valid JSON \(nested too deeply\)"),
    ('"lr": NaN', "NaN is not a JSON value"),
    ('"lr": -Infinity', "-Infinity is not a JSON value"),
    ('"x": ' + "[" * 300 + "]" * 300, r"nested more than 32 levels deep \(at x\[0\]"),
    ('"stats": {"lr": [1, 1e400]}', r"stats.lr\[1\]: numbers must be finite, got inf"),
    ('"data": "train\\udcff.jsonl"', r"data: not valid Unicode text \(a lone surrogate\)"),
    ('"\\ud800": 1', r"a key: not valid Unicode text"),
    ('"seed": ' + "9" * 400, r"seed: an integer of 1329 bits; at most 1024"),
])
def test_configs_python_reads_but_json_does_not_are_refused(folder, base, text, reason):
    """QA: a deeply nested config raised RecursionError (HTTP 500, a CLI traceback), one a few hundred levels
    deep loaded and then broke every listing of adapters; NaN (or 1e400, read as inf) was accepted, then
    `inspect --json` printed invalid JSON and the server showed null."""
    config = (folder / "adapter_config.json").read_text().rstrip().rstrip("}")
    (folder / "adapter_config.json").write_text(config + ", " + text + "}")
    with pytest.raises(AdapterValidationError, match=reason):
        load_adapter(folder, shapes(base))


def test_a_file_that_is_not_a_regular_file_is_named_so(folder, base):
    """QA: a folder, a pipe or a broken link where a file should be was called "missing"."""
    import os

    weights = folder / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(folder / "nowhere")
    with pytest.raises(AdapterValidationError, match="adapter_model.safetensors: a broken symbolic link"):
        load_adapter(folder, shapes(base))
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(AdapterValidationError, match="adapter_model.safetensors: not a regular file"):
        load_adapter(folder, shapes(base))
    config = folder / "adapter_config.json"
    config.unlink()
    config.mkdir()
    with pytest.raises(AdapterValidationError, match="adapter_config.json: not a regular file"):
        load_adapter(folder, shapes(base))
    config.rmdir()
    with pytest.raises(AdapterValidationError, match="adapter_config.json: missing"):
        load_adapter(folder, shapes(base))


def test_a_config_that_is_not_utf8_is_a_validation_error(folder, base):
    """QA: a config in another encoding raised UnicodeDecodeError past the checks (HTTP 500, not 422)."""
    (folder / "adapter_config.json").write_bytes(b'{"adapter_type": "s2ft", "note": "caf\xe9"}')
    with pytest.raises(AdapterValidationError, match="not valid JSON \\(not UTF-8 text"):
        load_adapter(folder, shapes(base))


def test_save_adapter_refuses_a_config_no_loader_would_take(tiny_llama_dir, tmp_path):
    """QA: `merge` wrote a config recording a non-UTF-8 path (a lone surrogate) and exited 0; every
    later load refused it. A trainer's non-finite loss is recorded as null instead."""
    from s2ft_serve.train.trainer import finite_or_none

    loaded = load_model(tiny_llama_dir)
    adapter = random_adapter(loaded.model, "caf\udce9", seed=1, channels=2)
    with pytest.raises(AdapterValidationError, match="not valid Unicode"):
        save_adapter(adapter, tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
    adapter.config["base_model"] = "tiny"
    adapter.config["training"] = {"final_val_loss": finite_or_none(float("nan")), "final_train_loss": finite_or_none(2.5)}
    load_adapter(save_adapter(adapter, tmp_path / "b"))

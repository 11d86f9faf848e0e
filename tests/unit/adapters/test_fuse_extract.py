"""`fuse` writes a plain HF model equal to base + adapter; `extract` gives the adapter back or refuses."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from s2ft_serve.adapters.extract import extract_adapter
from s2ft_serve.adapters.format import load_adapter, merge_into, save_adapter
from s2ft_serve.adapters.interop import fuse_to_model
from s2ft_serve.errors import AdapterValidationError, InvalidRequestError, ModelNotSupportedError
from s2ft_serve.model.loading import load_model
from s2ft_serve.model.testing import random_adapter


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _save_tuned(model, path):
    """Save a modified model the way a fine-tuning run would: a plain safetensors HF folder."""
    model.save_pretrained(path)
    return path


def _assert_same_adapter(expected, got, atol=1e-6):
    assert set(got.modules) == set(expected.modules)
    for name, md in expected.modules.items():
        order = torch.argsort(md.index)
        assert got.modules[name].index.tolist() == md.index[order].tolist(), name
        torch.testing.assert_close(got.modules[name].delta, md.delta[:, order], atol=atol, rtol=0, msg=name)


def _assert_within_rounding(base_weights, expected, got):
    """`fuse` then `extract` gives each delta value back within one float32 step of the larger of |W| and
    |W + delta| (the extracted value is (W + delta) - W in float32; README), whatever the delta's size."""
    assert set(got.modules) == set(expected.modules)
    for name, md in expected.modules.items():
        order = torch.argsort(md.index)
        index, delta = md.index[order], md.delta[:, order].float()
        assert got.modules[name].index.tolist() == index.tolist(), name
        W = base_weights[f"{name}.weight"][:, index].float()
        bound = torch.maximum(W.abs(), (W + delta).abs()) * 2.0**-23
        excess = (got.modules[name].delta.float() - delta).abs() - bound
        assert float(excess.max()) <= 0.0, (name, float(excess.max()))


@pytest.fixture()
def base_and_adapter(tiny_model_dir, tmp_path):
    loaded = load_model(tiny_model_dir)
    adapter = random_adapter(loaded.model, str(tiny_model_dir), seed=7, heads=2, channels=6,
                             fingerprint=loaded.fingerprint)
    save_adapter(adapter, tmp_path / "adapter")
    return loaded, adapter, tmp_path / "adapter"


def test_fused_model_is_base_plus_adapter_and_loads_anywhere(tiny_model_dir, base_and_adapter, tmp_path):
    from transformers import AutoTokenizer

    loaded, adapter, adapter_dir = base_and_adapter
    report = fuse_to_model(tiny_model_dir, adapter_dir, tmp_path / "fused")
    assert report.modules == len(adapter.modules) and report.parameters == adapter.num_parameters()
    fused = _hf(tmp_path / "fused")
    merge_into(loaded.model, adapter)
    ids = torch.tensor([[3, 17, 42, 5, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, loaded.model(ids).logits, atol=1e-5, rtol=0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "fused")
    assert tokenizer.encode("hello world") == loaded.tokenizer.encode("hello world")
    assert tokenizer.chat_template == loaded.tokenizer.chat_template


def test_fuse_then_extract_gives_back_the_adapter(tiny_model_dir, base_and_adapter, tmp_path):
    loaded, adapter, adapter_dir = base_and_adapter
    fuse_to_model(tiny_model_dir, adapter_dir, tmp_path / "fused")
    report = extract_adapter(tiny_model_dir, tmp_path / "fused", tmp_path / "extracted")
    assert not report.permuted and report.max_unchanged_diff == 0.0
    got = load_adapter(tmp_path / "extracted")
    _assert_same_adapter(adapter, got)
    _assert_within_rounding(loaded.model.state_dict(), adapter, got)
    assert got.fingerprint == loaded.fingerprint
    assert got.config["extracted_from"]["permuted"] is False


def test_fuse_refuses_an_adapter_of_another_base(tiny_llama_dir, tiny_qwen2_dir, tmp_path):
    other = load_model(tiny_qwen2_dir)
    adapter = random_adapter(other.model, "qwen", seed=1, fingerprint=other.fingerprint)
    save_adapter(adapter, tmp_path / "a")
    with pytest.raises(AdapterValidationError, match="base_model_fingerprint"):
        fuse_to_model(tiny_llama_dir, tmp_path / "a", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_outputs_never_overwrite(tiny_llama_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(InvalidRequestError, match="not empty"):
        fuse_to_model(tiny_llama_dir, tmp_path / "missing", tmp_path / "out")
    with pytest.raises(InvalidRequestError, match="not empty"):
        extract_adapter(tiny_llama_dir, tiny_llama_dir, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("tensor", ["self_attn.q_proj", "input_layernorm", "mlp.up_proj"])
def test_extract_refuses_when_other_weights_changed(tiny_llama_dir, tmp_path, tensor):
    model = _hf(tiny_llama_dir)
    with torch.no_grad():
        model.get_submodule(f"model.layers.1.{tensor}").weight[0] += 0.01
        model.model.layers[0].self_attn.o_proj.weight[:, 3] += 0.1  # a legitimate change as well
    _save_tuned(model, tmp_path / "tuned")
    with pytest.raises(InvalidRequestError, match=f"model.layers.1.{tensor}.weight") as info:
        extract_adapter(tiny_llama_dir, tmp_path / "tuned", tmp_path / "out")
    assert "tolerance" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_tolerance_admits_rounding_noise(tiny_llama_dir, tmp_path):
    model = _hf(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight += 1e-4
        model.model.layers[1].mlp.down_proj.weight[:, [4, 8]] += 0.05
    _save_tuned(model, tmp_path / "tuned")
    with pytest.raises(InvalidRequestError, match="post_attention_layernorm"):
        extract_adapter(tiny_llama_dir, tmp_path / "tuned", tmp_path / "strict")
    report = extract_adapter(tiny_llama_dir, tmp_path / "tuned", tmp_path / "loose", tolerance=1e-3)
    assert report.max_unchanged_diff == pytest.approx(1e-4, rel=1e-2)
    got = load_adapter(tmp_path / "loose")
    assert list(got.modules) == ["model.layers.1.mlp.down_proj"]
    assert got.modules["model.layers.1.mlp.down_proj"].index.tolist() == [4, 8]


def test_extract_refuses_an_unchanged_checkpoint(tiny_llama_dir, tmp_path):
    with pytest.raises(InvalidRequestError, match="nothing to extract"):
        extract_adapter(tiny_llama_dir, tiny_llama_dir, tmp_path / "out")


def test_extract_never_loads_pickle(tiny_llama_dir, tmp_path):
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tuned / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelNotSupportedError, match="pickle"):
        extract_adapter(tiny_llama_dir, tuned, tmp_path / "out")


def test_extract_refuses_a_checkpoint_of_another_model(tiny_llama_dir, tmp_path):
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(tuned / "model.safetensors"))
    with pytest.raises(InvalidRequestError, match="lacks tensor"):
        extract_adapter(tiny_llama_dir, tuned, tmp_path / "out")


@pytest.mark.slow
def test_default_model_fuse_and_extract(default_model_dir, tmp_path):
    """The real SmolLM2 (tied embeddings, converted tokenizer): fuse, load with transformers, extract."""
    from transformers import AutoTokenizer

    loaded = load_model(None)
    adapter = random_adapter(loaded.model, loaded.name, seed=5, heads=1, channels=16, fingerprint=loaded.fingerprint)
    save_adapter(adapter, tmp_path / "a")
    fuse_to_model(None, tmp_path / "a", tmp_path / "fused")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "fused")
    assert tokenizer.chat_template == loaded.tokenizer.chat_template
    ids = torch.tensor([loaded.tokenizer.encode("The capital of France is")])
    base_weights = {k: v.clone() for k, v in loaded.model.state_dict().items() if k.endswith("proj.weight")}
    merge_into(loaded.model, adapter)
    with torch.no_grad():
        torch.testing.assert_close(_hf(tmp_path / "fused")(ids).logits, loaded.model(ids).logits, atol=1e-4, rtol=0)
    extract_adapter(None, tmp_path / "fused", tmp_path / "x")
    _assert_within_rounding(base_weights, adapter, load_adapter(tmp_path / "x"))  # QA: up to 1.19e-7 here


def test_fuse_refuses_a_delta_the_base_dtype_cannot_hold(tiny_llama_dir, tmp_path):
    """QA: a float64 delta of 1e39 (finite, but inf in float32) was fused, exit 0, into a model with inf
    weights; the engine refuses it."""
    base = load_model(tiny_llama_dir)
    adapter = random_adapter(base.model, base.name, seed=3, dtype=torch.float64)
    name = next(n for n in adapter.modules if n.endswith("down_proj"))
    adapter.modules[name].delta[0, 0] = 1e39
    save_adapter(adapter, tmp_path / "big")
    with pytest.raises(AdapterValidationError, match=f"{name}.s2ft_delta.*finite in float32"):
        fuse_to_model(tiny_llama_dir, tmp_path / "big", tmp_path / "fused")
    assert not (tmp_path / "fused").exists() or not any((tmp_path / "fused").iterdir())


def test_extract_refuses_a_changed_column_that_is_not_finite(tiny_llama_dir, tmp_path):
    """QA: NaN > tolerance is False, so a NaN column was left out of the adapter without a word."""
    model = _hf(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 3] = float("nan")
        model.model.layers[1].mlp.down_proj.weight[:, 4] += 0.05
    _save_tuned(model, tmp_path / "tuned")
    with pytest.raises(InvalidRequestError, match="layers.0.self_attn.o_proj.weight.*not finite"):
        extract_adapter(tiny_llama_dir, tmp_path / "tuned", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_damaged_or_odd_checkpoint_file_is_one_line_exit_2(tiny_llama_dir, tmp_path, capsys):
    """QA: a truncated model.safetensors gave a traceback and exit 1, a folder named model.safetensors an
    error naming no file, and a FIFO among the checkpoint's files hung extract forever."""
    import os

    from s2ft_serve.adapters.cli import main

    cases = {}
    cases["truncated"] = tmp_path / "truncated"
    cases["truncated"].mkdir()
    (cases["truncated"] / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    cases["folder"] = tmp_path / "folder"
    (cases["folder"] / "model.safetensors").mkdir(parents=True)
    cases["fifo"] = tmp_path / "fifo"
    cases["fifo"].mkdir()
    os.mkfifo(cases["fifo"] / "model.safetensors")
    for what, tuned in cases.items():
        assert main(["extract", "--base", str(tiny_llama_dir), "--tuned", str(tuned),
                     "--out", str(tmp_path / f"out-{what}")]) == 2, what
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # (not the progress bar)
        assert len(errors) == 1 and str(tuned / "model.safetensors") in errors[0], (what, errors)
    base = tmp_path / "damaged-base"
    shutil.copytree(tiny_llama_dir, base)
    (base / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert main(["extract", "--base", str(base), "--tuned", str(tiny_llama_dir), "--out", str(tmp_path / "o")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(base) in errors[0] and "not readable safetensors" in errors[0]


def test_extract_reads_the_files_transformers_loads(tiny_model_dir, base_and_adapter, tmp_path):
    """QA: every *.safetensors in the folder was read, the last by name winning, so a stale copy beside
    the checkpoint (here the base itself) was diffed instead of it."""
    _, adapter, folder = base_and_adapter
    tuned = fuse_to_model(tiny_model_dir, folder, tmp_path / "tuned").out_dir
    shutil.copy(tiny_model_dir / "model.safetensors", tuned / "model_old.safetensors")
    extract_adapter(tiny_model_dir, tuned, tmp_path / "x")
    _assert_same_adapter(adapter, load_adapter(tmp_path / "x"))
    (tuned / "model.safetensors").rename(tuned / "weights.safetensors")  # two files, none says which
    with pytest.raises(ModelNotSupportedError, match="neither model.safetensors nor"):
        extract_adapter(tiny_model_dir, tuned, tmp_path / "y")


def test_fuse_leaves_the_bases_other_weight_files_out(tiny_llama_dir, tmp_path):
    """QA: a base's GGUF, TF, Flax or ONNX weights were copied beside the fused ones, stale and unfused."""
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    for name in ("model.gguf", "tf_model.h5", "flax_model.msgpack", "model.onnx", "notes.txt"):
        (base / name).write_text("x")
    loaded = load_model(base)
    adapter = random_adapter(loaded.model, str(base), seed=1, channels=3)
    save_adapter(adapter, tmp_path / "a")
    fuse_to_model(base, tmp_path / "a", tmp_path / "fused")
    names = {p.name for p in (tmp_path / "fused").iterdir()}
    assert "notes.txt" in names and not names & {"model.gguf", "tf_model.h5", "flax_model.msgpack", "model.onnx"}

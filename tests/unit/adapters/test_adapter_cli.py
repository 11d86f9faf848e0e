"""`s2ft-adapter` end to end: inspect, merge, fuse, extract, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from s2ft_serve.adapters.cli import main, parse_source
from s2ft_serve.adapters.format import load_adapter, save_adapter
from s2ft_serve.model.loading import load_model
from s2ft_serve.model.testing import random_adapter


@pytest.fixture()
def adapters(tiny_llama_dir, tmp_path):
    loaded = load_model(tiny_llama_dir)
    paths = []
    for seed, heads, channels in ((1, 2, 5), (2, 1, 9)):
        adapter = random_adapter(loaded.model, str(tiny_llama_dir), seed=seed, heads=heads, channels=channels,
                                 fingerprint=loaded.fingerprint)
        paths.append(save_adapter(adapter, tmp_path / f"a{seed}"))
    return loaded, paths


def test_inspect_json_reports_heads_channels_size_and_fingerprint(adapters, capsys):
    loaded, (a1, _) = adapters
    assert main(["inspect", str(a1), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["base_model_fingerprint"] == loaded.fingerprint
    assert report["head_dim"] == 16  # read from the base model's config.json
    assert report["per_layer"]["0"] == {"heads": 2, "o_proj_columns": 32, "channels": 5}
    assert report["parameters"] == 2 * (64 * 32 + 64 * 5)
    assert report["bytes"] == (a1 / "adapter_model.safetensors").stat().st_size
    assert report["config"]["selection"] == {"strategy": "random", "seed": 1}


def test_inspect_text(adapters, capsys):
    _, (a1, _) = adapters
    assert main(["inspect", str(a1)]) == 0
    out = capsys.readouterr().out
    assert "parameters   4,736" in out
    assert "     1      2           32         5" in out  # layer 1: 2 heads, 32 columns, 5 channels


def test_merge_with_weights(adapters, tmp_path, capsys):
    _, (a1, a2) = adapters
    assert main(["merge", "--out", str(tmp_path / "m"), f"{a1}:0.25", str(a2)]) == 0
    merged = load_adapter(tmp_path / "m")
    assert [s["weight"] for s in merged.config["merged_from"]] == [0.25, 1.0]
    one, two = load_adapter(a1), load_adapter(a2)
    name = "model.layers.0.mlp.down_proj"
    expected = set(one.modules[name].index.tolist()) | set(two.modules[name].index.tolist())
    assert merged.modules[name].index.tolist() == sorted(expected)
    assert "merged 0.25*" in capsys.readouterr().out


def test_fuse_and_extract_round_trip(adapters, tiny_llama_dir, tmp_path, capsys):
    _, (a1, _) = adapters
    assert main(["fuse", "--model", str(tiny_llama_dir), "--adapter", str(a1), "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "model.safetensors").is_file() and (tmp_path / "f" / "tokenizer.json").is_file()
    assert main(["extract", "--base", str(tiny_llama_dir), "--tuned", str(tmp_path / "f"),
                 "--out", str(tmp_path / "x")]) == 0
    assert "no permutation" in capsys.readouterr().out
    original, extracted = load_adapter(a1), load_adapter(tmp_path / "x")
    for name, md in original.modules.items():
        assert extracted.modules[name].index.tolist() == sorted(md.index.tolist())
        torch.testing.assert_close(extracted.modules[name].delta, md.delta[:, torch.argsort(md.index)],
                                   atol=1e-6, rtol=0)


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s2ft-adapter inspect: error:") and "no such directory" in err


@pytest.mark.parametrize("command", ["merge", "fuse", "extract"])
def test_an_output_that_cannot_be_created_is_one_line_exit_2_before_any_work(adapters, tmp_path, capsys,
                                                                              monkeypatch, command):
    """An --out under a file (QA: a FileExistsError traceback, exit 1, after loading the model) is refused
    as one line, exit 2, before any model is loaded."""
    import s2ft_serve.adapters.extract as extract
    import s2ft_serve.adapters.interop as interop

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(interop, "load_model", no_loading)
    monkeypatch.setattr(extract, "load_model", no_loading)
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "afile" / "sub")
    _, (a1, _) = adapters
    argv = {"merge": ["merge", "--out", out, str(a1)], "fuse": ["fuse", "--adapter", str(a1), "--out", out],
            "extract": ["extract", "--tuned", str(a1), "--out", out]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"s2ft-adapter {command}: error:") and "cannot be created there" in err
    assert "afile is not a folder" in err
    assert len(err.strip().splitlines()) == 1


def test_checking_the_output_creates_nothing(tmp_path, capsys):
    """The output check runs first, and a command that then fails leaves no folder behind."""
    out = tmp_path / "new" / "deeper" / "merged"
    assert main(["merge", "--out", str(out), str(tmp_path / "missing-adapter")]) == 2
    assert "s2ft-adapter merge: error:" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_file_system_error_while_writing_is_one_line_exit_2(adapters, tmp_path, capsys, monkeypatch):
    """An OSError the checks could not foresee (here a full disk while saving) is one line, exit 2, not a
    traceback, and leaves nothing half-written."""
    import errno

    import s2ft_serve.adapters.format as adapter_format

    def disk_full(adapter, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(adapter_format, "save_adapter", disk_full)
    _, (a1, _) = adapters
    assert main(["merge", "--out", str(tmp_path / "m"), str(a1)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s2ft-adapter merge: error:") and os.strerror(errno.ENOSPC) in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m-")]


def test_inspect_counts_heads_with_the_head_dim_the_trainer_recorded(adapters, tmp_path, capsys, monkeypatch):
    """QA: s2ft-train records the base model as typed (`--model tiny`); inspect looked that relative path
    up from the working folder, showing heads as `?` elsewhere, though the config holds the head size."""
    loaded, _ = adapters
    adapter = random_adapter(loaded.model, "tiny", seed=3, heads=1, channels=4)
    adapter.config["selection"] = {"strategy": "random", "head_dim": 16}
    folder = save_adapter(adapter, tmp_path / "trained")
    monkeypatch.chdir(tmp_path)  # no ./tiny here
    assert main(["inspect", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["head_dim"] == 16 and report["per_layer"]["0"]["heads"] == 1


def test_inspect_into_a_closed_pipe_is_quiet(adapters, capsys, monkeypatch, tmp_path):
    """QA: `s2ft-adapter inspect X | head -1` printed 'error: Broken pipe' and exited 2."""
    _, (a1, _) = adapters

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return spare

    spare = os.open(tmp_path / "spare", os.O_WRONLY | os.O_CREAT)
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    try:
        assert main(["inspect", str(a1)]) == 0
    finally:
        os.close(spare)
    assert capsys.readouterr().err == ""


def test_inspect_refuses_a_non_positive_head_dim(adapters, capsys):
    _, (a1, _) = adapters
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", str(a1), "--head-dim", "-5"])
    assert exit_.value.code == 2 and "must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("spec, expected", [("a/b:0.5", ("a/b", 0.5)), ("a/b", ("a/b", 1.0)),
                                            ("c:/x", ("c:/x", 1.0)), ("d:-2", ("d", -2.0))])
def test_parse_source(spec, expected):
    assert parse_source(spec) == expected


def test_console_script_runs(adapters):
    _, (a1, _) = adapters
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    script = os.path.join(os.path.dirname(sys.executable), "s2ft-adapter")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "s2ft_serve.adapters.cli"]
    done = subprocess.run(command + ["inspect", str(a1), "--json"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["modules"] == 4


def test_outputs_are_readable_as_the_umask_allows(adapters, tmp_path, monkeypatch):
    """QA: outputs were 0700 folders with 0600 weights whatever the umask (mkdtemp, safetensors 0.8), so a
    server running as another user (the image's uid 1000) could not read them."""
    import stat

    _, (a1, a2) = adapters
    old = os.umask(0o022)
    try:
        assert main(["merge", "--out", str(tmp_path / "m"), str(a1), str(a2)]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "m", *(tmp_path / "m").iterdir()]}
    assert modes == {"m": 0o755, "adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}
    assert stat.S_IMODE((a1 / "adapter_model.safetensors").stat().st_mode) == 0o644  # save_adapter's own


def test_the_current_folder_as_output_is_refused_before_any_work(adapters, tmp_path, capsys, monkeypatch):
    """QA: `--out .` (and an empty mount point, a container's volume) passed the check, then failed after
    the whole load and fuse: the output replaces its folder, which cannot be done to those."""
    import s2ft_serve.adapters.interop as interop

    monkeypatch.setattr(interop, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    _, (a1, _) = adapters
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main(["fuse", "--adapter", str(a1), "--out", "."]) == 2
    assert "a mount point or the current folder" in capsys.readouterr().err


def test_a_termination_signal_while_writing_leaves_nothing_behind(adapters, tmp_path, monkeypatch):
    """QA: SIGTERM (`timeout`, a job's cancel) left the hidden temporary output folder behind."""
    import signal

    import s2ft_serve.adapters.format as fmt

    _, (a1, a2) = adapters
    save = fmt.save_adapter

    def killed_midway(adapter, path):
        save(adapter, path)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(fmt, "save_adapter", killed_midway)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited:
        main(["merge", "--out", str(tmp_path / "m"), str(a1), str(a2)])
    assert exited.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a1", "a2"]  # no .m-XXXX, no m
    assert signal.getsignal(signal.SIGTERM) is before  # main restores the handlers it set


def test_paths_that_are_not_utf8_are_refused_before_anything_is_written(adapters, tmp_path, capsys):
    """QA: merge exited 0 with a config recording the path as a lone surrogate, which nothing could load."""
    _, (a1, _) = adapters
    odd = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    os.rename(a1, odd)
    assert main(["merge", "--out", str(tmp_path / "m"), odd]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main(["merge", "--out", str(tmp_path / "m"), "--base-model", "b\udce9", str(tmp_path / "a2")]) == 2
    assert not (tmp_path / "m").exists()


def test_inspect_shows_heads_unknown_when_base_model_cannot_be_read(adapters, tmp_path, capsys):
    """QA: a long `base_model`, or one naming a folder whose config.json is not an object, failed inspect
    (exit 2, or a traceback), though it is informational and the engine loads the adapter."""
    loaded, _ = adapters
    (tmp_path / "odd-base").mkdir()
    (tmp_path / "odd-base" / "config.json").write_text("[1, 2]")
    for i, base_model in enumerate(["x" * 300, "d/" * 3000, str(tmp_path / "odd-base")]):
        folder = save_adapter(random_adapter(loaded.model, base_model, seed=i, heads=1, channels=2), tmp_path / f"b{i}")
        assert main(["inspect", str(folder), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["head_dim"] is None


def test_inspect_reads_a_folder_whose_name_is_not_utf8(adapters, tmp_path, capsys):
    """QA (red team): the UTF-8 check also refused `inspect`, which only reads; --out stays refused, since
    the engine (and safetensors, for a fused model) would not read what is written there."""
    _, (a1, a2) = adapters
    odd = os.fsdecode(bytes(tmp_path) + b"/ad-\xff")
    os.rename(a1, odd)
    assert main(["inspect", odd]) == 0 and "ad-\\xff" in capsys.readouterr().out
    out = os.fsdecode(bytes(tmp_path) + b"/merged-\xff")
    assert main(["merge", "--out", out, str(a2)]) == 2 and not os.path.exists(out)


def test_a_symbolic_link_as_output_is_refused_before_any_work(adapters, tmp_path, capsys):
    """QA (red team): a link to an empty folder passed the check, then failed after the work."""
    _, (a1, _) = adapters
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    assert main(["merge", "--out", str(tmp_path / "link"), str(a1)]) == 2
    assert "symbolic link" in capsys.readouterr().err

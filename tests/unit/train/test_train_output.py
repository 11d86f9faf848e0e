"""What `s2ft-train` may write into: its --output holds only its checkpoints and its adapter, and the
adapter is written whole or not at all."""

from __future__ import annotations

import shutil

import pytest

from s2ft_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE, load_adapter
from s2ft_serve.errors import ConflictError, InvalidRequestError
from s2ft_serve.model.loading import load_model
from s2ft_serve.model.testing import device_under_test
from s2ft_serve.train.config import TrainConfig
from s2ft_serve.train.trainer import train


def _cfg(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), output=str(out), device=device_under_test(), max_steps=2,
                batch_size=8, learning_rate=2e-2, heads_per_layer=1, channels_per_layer=4, progress=False)
    return TrainConfig(**{**base, **kw})


def _contents(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_an_output_holding_other_files_or_an_adapter_is_refused_and_loses_nothing(tiny_llama_dir, task_file,
                                                                                  tmp_path):
    """QA: a run into the base model's own folder wrote an adapter there (transformers then took the
    folder for a PEFT adapter and no longer loaded it), and a run into an adapter's folder replaced it."""
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    before = _contents(base)
    with pytest.raises(ConflictError, match="already holds other files .*config.json"):
        train(_cfg(base, task_file, base))
    assert _contents(base) == before
    load_model(str(base))  # still a model

    out = tmp_path / "out"
    train(_cfg(tiny_llama_dir, task_file, out))
    written = _contents(out)
    with pytest.raises(ConflictError, match="already holds an adapter; pass --resume"):
        train(_cfg(tiny_llama_dir, task_file, out, seed=7))
    assert _contents(out) == written
    # a resumed run may write it again; an empty folder is a fresh one
    train(_cfg(tiny_llama_dir, task_file, out, resume=True))
    (tmp_path / "empty").mkdir()
    train(_cfg(tiny_llama_dir, task_file, tmp_path / "empty"))
    assert load_adapter(tmp_path / "empty").modules


def test_an_adapter_that_cannot_be_written_leaves_no_half_and_keeps_what_was_written(tiny_llama_dir, task_file,
                                                                                      tmp_path, monkeypatch):
    """QA: the adapter's files were written straight into --output one after the other; a failed config
    write (here: the move of the config) left the new weights with no config, and the training lost."""
    import s2ft_serve.train.trainer as trainer

    out = tmp_path / "out"
    train(_cfg(tiny_llama_dir, task_file, out))
    old = load_adapter(out)
    real = trainer.os.replace

    def fail_on_config(src, dst):
        if str(dst).endswith(CONFIG_FILE):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(trainer.os, "replace", fail_on_config)
    with pytest.raises(InvalidRequestError, match="could not write the adapter .*No space left.*kept in"):
        train(_cfg(tiny_llama_dir, task_file, out, resume=True, max_steps=3))
    # never new weights beside the old config: no config at all, which no loader mistakes for an adapter
    assert not (out / CONFIG_FILE).exists() and (out / WEIGHTS_FILE).exists()
    staged = [p for p in out.iterdir() if p.name.startswith(".adapter-")]
    assert len(staged) == 1 and (staged[0] / CONFIG_FILE).is_file()
    monkeypatch.setattr(trainer.os, "replace", real)
    train(_cfg(tiny_llama_dir, task_file, out, resume=True, max_steps=3))  # the staging folder is no obstacle
    assert load_adapter(out).modules.keys() == old.modules.keys()

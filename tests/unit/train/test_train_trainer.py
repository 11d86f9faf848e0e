"""The trainer end to end on a tiny model: loss goes down, only selected columns change, the
adapter reproduces the trainer's own logits, resume equals an uninterrupted run."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch

from s2ft_serve.adapters.format import load_adapter, merge_into
from s2ft_serve.errors import ConflictError, DataValidationError, InvalidRequestError
from s2ft_serve.model.loading import load_model
from s2ft_serve.model.testing import device_under_test
from s2ft_serve.train.config import TrainConfig
from s2ft_serve.train.trainer import train


def _cfg(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), output=str(out), device=device_under_test(), max_steps=12,
                batch_size=8, learning_rate=2e-2, heads_per_layer=1, channels_per_layer=8, progress=False)
    base.update(kw)
    return TrainConfig(**base)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids.to(model.device)).logits[0].float().cpu()


def test_training_lowers_loss_and_writes_a_recorded_adapter(tiny_model_dir, task_file, val_file, tmp_path):
    before = train(_cfg(tiny_model_dir, task_file, tmp_path / "zero", max_steps=1, learning_rate=1e-9,
                        val_data=str(val_file))).final_val_loss
    res = train(_cfg(tiny_model_dir, task_file, tmp_path / "out", val_data=str(val_file), max_steps=25))
    assert res.final_val_loss < before - 0.5
    adapter = load_adapter(res.path)
    cfg = adapter.config
    assert cfg["base_model_fingerprint"] == load_model(tiny_model_dir).fingerprint
    assert cfg["selection"]["strategy"] == "random" and cfg["selection"]["heads_per_layer"] == 1
    assert cfg["seed"] == 42
    assert cfg["training"]["steps"] == 25 and cfg["training"]["data_sha256"].startswith("sha256:")
    assert cfg["training"]["final_val_loss"] == pytest.approx(res.final_val_loss)
    assert cfg["training"]["final_train_loss"] is not None


def test_only_selected_columns_change_and_merged_adapter_reproduces_logits(tiny_model_dir, task_file, tmp_path):
    res = train(_cfg(tiny_model_dir, task_file, tmp_path / "out", strategy="activation"))
    fresh = load_model(tiny_model_dir).model
    trained_base = {n.replace(".base.", "."): p.cpu() for n, p in res.model.named_parameters()
                    if not n.endswith("delta")}
    for name, p in fresh.named_parameters():  # every base weight bit-identical after training
        assert torch.equal(p, trained_base[name]), name
    adapter = load_adapter(res.path)
    for name, md in adapter.modules.items():
        assert torch.equal(md.index, res.layers[name].index.cpu())
        assert bool((md.delta != 0).any())
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    merge_into(fresh, adapter)
    for name, p in fresh.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in adapter.modules:
            untouched = torch.ones(p.shape[1], dtype=torch.bool)
            untouched[adapter.modules[module].index] = False
            assert torch.equal(p[:, untouched], before[name][:, untouched])
            assert not torch.equal(p[:, ~untouched], before[name][:, ~untouched])
        else:
            assert torch.equal(p, before[name])
    ids = torch.tensor([[5, 17, 33, 2, 90, 41, 7]])
    assert (_logits(res.model, ids) - _logits(fresh, ids)).abs().max() <= 1e-4


def test_resume_from_checkpoint_equals_uninterrupted_run(tiny_llama_dir, task_file, tmp_path):
    full = train(_cfg(tiny_llama_dir, task_file, tmp_path / "a", max_steps=6, grad_accum=2, batch_size=4))
    cut = _cfg(tiny_llama_dir, task_file, tmp_path / "b", max_steps=6, grad_accum=2, batch_size=4, save_every=3)
    train(cut)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-6")  # as if the run had died after step 3
    cut.resume = True
    resumed = train(cut)
    for name, layer in full.layers.items():
        torch.testing.assert_close(resumed.layers[name].delta, layer.delta, rtol=0, atol=1e-6)


def test_resume_from_a_checkpoint_beyond_max_steps_is_refused(tiny_llama_dir, task_file, tmp_path):
    """QA: resuming a 10-step run's checkpoint with --max-steps 7 ran nothing and recorded 7 steps on
    the 10-step adapter."""
    train(_cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=4, save_every=2))
    with pytest.raises(ConflictError, match=r"step-4 is at step 4, beyond this run's 3 steps"):
        train(_cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=3, resume=True))
    again = train(_cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=4, resume=True))
    assert again.steps == 4 and load_adapter(again.path).config["training"]["steps"] == 4


def test_a_damaged_checkpoint_is_one_clear_error_naming_it(tiny_llama_dir, task_file, tmp_path):
    """QA: a state.json missing a key (KeyError) or a truncated state.safetensors (SafetensorError)
    made --resume a traceback."""
    train(_cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=4, save_every=2))
    step = tmp_path / "out" / "checkpoints" / "step-4"
    meta = json.loads((step / "state.json").read_text())
    (step / "state.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "adam_steps"}))
    with pytest.raises(InvalidRequestError, match=r"step-4: a damaged checkpoint \(KeyError: 'adam_steps'\)"):
        train(_cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=4, resume=True))
    (step / "state.json").write_text(json.dumps(meta))
    tensors = (step / "state.safetensors").read_bytes()
    (step / "state.safetensors").write_bytes(tensors[: len(tensors) // 2])
    with pytest.raises(InvalidRequestError, match=r"step-4: a damaged checkpoint \(SafetensorError"):
        train(_cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=4, resume=True))
    shutil.rmtree(step)  # as the message says: the one before it resumes
    assert train(_cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=4, resume=True)).steps == 4


def test_other_damage_to_a_checkpoint_is_the_same_clear_error(tiny_llama_dir, task_file, tmp_path, caplog):
    """The red team, after the QA fix above: a state.json holding a JSON array (AttributeError), a step of
    1e999 (OverflowError) or moments of another shape (a RuntimeError inside AdamW at the first step, after
    the resume had succeeded) were tracebacks; a step folder without a state.json was skipped unsaid."""
    train(_cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=4, save_every=2))
    step = tmp_path / "out" / "checkpoints" / "step-4"
    meta = json.loads((step / "state.json").read_text())
    resume = _cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=6, resume=True)
    for damaged in ([meta], {**meta, "step": "1e999"}, {**meta, "losses": ["x"]}):
        text = json.dumps(damaged).replace('"1e999"', "1e999")
        (step / "state.json").write_text(text)
        with pytest.raises(InvalidRequestError, match=r"step-4: a damaged checkpoint \((ValueError|OverflowError)"):
            train(resume)
    (step / "state.json").write_text(json.dumps(meta))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(step / "state.safetensors"))
    good = dict(tensors)
    name = next(k for k in tensors if k.endswith(".exp_avg"))
    tensors[name] = torch.zeros(tensors[name].numel() + 1)
    save_file(tensors, str(step / "state.safetensors"))
    with pytest.raises(InvalidRequestError, match=r"step-4: a damaged checkpoint \(ValueError: .*exp_avg has shape"):
        train(resume)
    save_file(good, str(step / "state.safetensors"))
    (step / "state.json").unlink()  # cut short before its state.json: skipped, and said so
    with caplog.at_level("WARNING"):
        assert train(resume).steps == 6
    assert "step-4 has no state.json" in caplog.text


def test_validation_examples_are_scored_unpacked(tiny_llama_dir, task_file, val_file, tmp_path):
    """QA: with --packing the validation file was packed too, so each example was scored after the
    previous ones: a loss that serving the examples never reproduces."""
    still = dict(max_steps=1, learning_rate=1e-12, max_length=64, val_data=str(val_file))  # the base, in effect
    packed = train(_cfg(tiny_llama_dir, task_file, tmp_path / "p", packing=True, **still)).final_val_loss
    plain = train(_cfg(tiny_llama_dir, task_file, tmp_path / "u", **still)).final_val_loss
    assert packed == pytest.approx(plain, abs=1e-5)


def test_fresh_run_into_an_earlier_runs_checkpoints_is_refused_and_loses_nothing(tiny_llama_dir, task_file,
                                                                                   tmp_path):
    train(_cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=4, save_every=2))
    ckpts = tmp_path / "out" / "checkpoints"
    before = {p.relative_to(ckpts): p.read_bytes() for p in ckpts.rglob("*") if p.is_file()}
    with pytest.raises(ConflictError, match=r"earlier run \(step-2, step-4\); pass --resume .* another --output"):
        train(_cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=2, save_every=1))
    assert {p.relative_to(ckpts): p.read_bytes() for p in ckpts.rglob("*") if p.is_file()} == before


def test_resume_on_other_data_refused_but_old_checkpoints_stay_resumable(tiny_llama_dir, task_file, tmp_path):
    cfg = _cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=4, save_every=2, keep_checkpoints=1)
    train(cfg)
    step4 = tmp_path / "out" / "checkpoints" / "step-4"
    assert json.loads((step4 / "state.json").read_text())["data_sha256"]["data"].startswith("sha256:")
    other = tmp_path / "other.jsonl"
    other.write_text(task_file.read_text() + json.dumps({"prompt": "fox ->", "completion": " test"}) + "\n")
    with pytest.raises(InvalidRequestError, match="different --data file"):
        train(_cfg(tiny_llama_dir, other, tmp_path / "out", max_steps=6, resume=True))
    with pytest.raises(InvalidRequestError, match="different --val-data file"):
        train(_cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=6, resume=True, val_data=str(other)))
    meta = json.loads((step4 / "state.json").read_text())
    del meta["data_sha256"]  # as written before checkpoints recorded their data
    (step4 / "state.json").write_text(json.dumps(meta))
    cfg.resume, cfg.max_steps = True, 6
    assert train(cfg).steps == 6


def test_unwritable_output_refused_cleanly_before_the_model_loads(tiny_llama_dir, task_file, tmp_path, capsys,
                                                                 monkeypatch):
    from s2ft_serve.train import trainer
    from s2ft_serve.train.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(trainer, "load_model", no_loading)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for output in (afile / "x", afile):
        code = main(["--model", str(tiny_llama_dir), "--data", str(task_file), "--output", str(output),
                     "--max-steps", "2", "--device", "cpu", "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err.startswith(f"s2ft-train: error: --output {output}: cannot create or write") and "\n" not in err


def test_dtype_aliases_are_recorded_in_one_spelling(tiny_llama_dir, task_file, tmp_path):
    assert TrainConfig(dtype="fp32").dtype == "float32"
    res = train(_cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=1, dtype="bf16"))
    assert load_adapter(res.path).config["training"]["dtype"] == "bfloat16"


def test_malformed_data_refused_before_anything_is_written(tiny_llama_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 5}\n')
    with pytest.raises(DataValidationError, match=r"bad.jsonl:2: 'completion' must be a string"):
        train(_cfg(tiny_llama_dir, data, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_options_refused(tiny_llama_dir, task_file, tmp_path):
    with pytest.raises(InvalidRequestError, match="--batch-size"):
        train(_cfg(tiny_llama_dir, task_file, tmp_path / "o", batch_size=0))
    with pytest.raises(InvalidRequestError, match="--strategy"):
        train(_cfg(tiny_llama_dir, task_file, tmp_path / "o", strategy="best"))
    with pytest.raises(InvalidRequestError, match="--attention-share"):
        train(_cfg(tiny_llama_dir, task_file, tmp_path / "o", attention_share=-0.1))
    # QA: these crashed with torch's tracebacks after the model had loaded, or were taken silently
    for field, value in (("learning_rate", float("nan")), ("adam_beta1", 2.0), ("adam_eps", -1.0),
                         ("weight_decay", -1.0), ("warmup_steps", -2), ("warmup_ratio", 3.0), ("save_every", -1),
                         ("eval_every", -1), ("keep_checkpoints", 0), ("max_grad_norm", -1.0), ("device", "bogus"),
                         ("learning_rate", 1e38)):  # (QA: overflowed inside AdamW)
        with pytest.raises(InvalidRequestError, match="--" + field.replace("_", "-")):
            train(_cfg(tiny_llama_dir, task_file, tmp_path / "o", **{field: value}))
    with pytest.raises(InvalidRequestError, match=r"--epochs must lie in \(0, 1000000\]"):  # QA: 1e308 overflowed
        train(_cfg(tiny_llama_dir, task_file, tmp_path / "o", max_steps=None, epochs=1e308))
    # QA: a path that is not UTF-8 trained to the end, then the config it is recorded in was refused
    odd = str(tmp_path / "caf\udce9")
    for field, args in (("data", (tiny_llama_dir, odd)), ("val_data", (tiny_llama_dir, task_file)),
                        ("model", (odd, task_file)), ("output", (tiny_llama_dir, task_file))):
        extra = {"val_data": odd} if field == "val_data" else {"output": odd} if field == "output" else {}
        with pytest.raises(InvalidRequestError, match=f"--{field.replace('_', '-')} .*not valid UTF-8"):
            train(_cfg(*args, tmp_path / "o", **extra))
    # the Python API takes paths too (the red team: the check failed on a Path; a Path val_data trained, then
    # the config recording it could not be saved)
    result = train(_cfg(pathlib.Path(tiny_llama_dir), pathlib.Path(task_file), pathlib.Path(tmp_path / "p"),
                        val_data=pathlib.Path(task_file), max_steps=1))
    assert load_adapter(result.path).config["training"]["val_data"] == str(task_file)
    assert not (tmp_path / "o").exists()


def _uneven_task(path, n: int = 24):
    """Prompt/completion rows of 2 to 12 words each side: micro-batches hold different label counts."""
    import random

    words = ["fox", "dog", "world", "answer", "tiny", "test", "sparse", "column"]
    r = random.Random(5)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(r.choice(words) for _ in range(r.randint(2, 12)))
            f.write(json.dumps({"prompt": prompt + " ->",
                                "completion": " " + " ".join(r.choice(words) for _ in range(r.randint(1, 12)))}) + "\n")
    return path


def test_accumulated_micro_batches_equal_one_batch_of_their_rows(tiny_llama_dir, tmp_path):
    """QA: each micro-batch's mean loss weighed the same, so on rows of different lengths two micro-batches
    of 2 accumulated gave another gradient (7.5 % off) than one batch of 4: now every label token weighs
    the same (DDP the same way, see tests/integration/test_train_ddp.py)."""
    data = _uneven_task(tmp_path / "uneven.jsonl")
    one = train(_cfg(tiny_llama_dir, data, tmp_path / "one", batch_size=4, grad_accum=1, max_steps=3))
    acc = train(_cfg(tiny_llama_dir, data, tmp_path / "acc", batch_size=2, grad_accum=2, max_steps=3))
    for name, layer in one.layers.items():
        assert torch.equal(acc.layers[name].index, layer.index)
        torch.testing.assert_close(acc.layers[name].delta, layer.delta, rtol=0, atol=1e-6)
    assert abs(acc.final_train_loss - one.final_train_loss) < 1e-5


@pytest.mark.parametrize("strategy", ["activation", "gradient"])
def test_scored_selections_do_not_depend_on_the_batch_size(tiny_llama_dir, tmp_path, strategy):
    """QA: the activation scores counted padding as data (and the gradient scores weighed batches, not
    tokens), so the columns chosen changed with --batch-size (450 of 2,340 channels on SmolLM2)."""
    data = _uneven_task(tmp_path / "uneven.jsonl")
    chosen = []
    for batch in (1, 8):
        res = train(_cfg(tiny_llama_dir, data, tmp_path / f"b{batch}", batch_size=batch, max_steps=1,
                         strategy=strategy, calibration_fraction=1.0, learning_rate=1e-9))
        chosen.append({name: layer.index.tolist() for name, layer in res.layers.items()})
    assert chosen[0] == chosen[1]


def test_resume_with_other_modules_or_another_batch_layout_is_refused(tiny_llama_dir, task_file, tmp_path, caplog):
    """QA: a resume whose selection trained fewer modules dropped the checkpoint's other deltas and
    recorded every step; one with another global batch continued another data order; --resume with no
    checkpoint started from scratch without a word."""
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="s2ft_serve.train.loop"):
        train(_cfg(tiny_llama_dir, task_file, out, max_steps=4, save_every=2, resume=True))
    assert "no complete checkpoint" in caplog.text
    with pytest.raises(InvalidRequestError, match="other modules"):
        train(_cfg(tiny_llama_dir, task_file, out, max_steps=6, heads_per_layer=0, resume=True))
    with pytest.raises(InvalidRequestError, match="with global batch 8 .* has global batch 4:"):
        train(_cfg(tiny_llama_dir, task_file, out, max_steps=6, batch_size=4, resume=True))
    with pytest.raises(InvalidRequestError, match="with grad accum 1 .* has grad accum 2:"):
        train(_cfg(tiny_llama_dir, task_file, out, max_steps=6, grad_accum=2, resume=True))
    # QA: these change the rows and their order too, and were taken
    with pytest.raises(InvalidRequestError, match="with max length 1024 .* has max length 16:"):
        train(_cfg(tiny_llama_dir, task_file, out, max_steps=6, max_length=16, resume=True))
    with pytest.raises(InvalidRequestError, match="packing False.*packing True"):
        train(_cfg(tiny_llama_dir, task_file, out, max_steps=6, packing=True, resume=True))
    assert train(_cfg(tiny_llama_dir, task_file, out, max_steps=6, resume=True)).steps == 6


def test_attention_share_zero_trains_down_proj_channels_only(tiny_llama_dir, task_file, tmp_path):
    res = train(_cfg(tiny_llama_dir, task_file, tmp_path / "ffn", heads_per_layer=None, channels_per_layer=None,
                     attention_share=0.0, trainable_ratio=0.02, max_steps=2))
    adapter = load_adapter(res.path)
    assert adapter.modules and all(name.endswith("mlp.down_proj") for name in adapter.modules)
    assert adapter.config["selection"]["heads_per_layer"] == 0
    assert adapter.config["selection"]["channels_per_layer"] > 0


def test_cli_help_documents_every_option_and_cli_trains(tiny_llama_dir, task_file, tmp_path, capsys):
    from dataclasses import fields

    from s2ft_serve.train.cli import build_parser, main

    text = build_parser().format_help()
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    code = main(["--model", str(tiny_llama_dir), "--data", str(task_file), "--output", str(tmp_path / "cli"),
                 "--max-steps", "2", "--device", "cpu", "--packing", "--max-length", "32", "--no-progress",
                 "--dtype", "bfloat16"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    assert load_adapter(tmp_path / "cli").config["training"]["packing"] is True


def test_save_dtype_bfloat16_writes_the_trained_deltas_rounded_once(tiny_llama_dir, task_file, tmp_path):
    """`--save-dtype bfloat16`: the same training, its float32 deltas rounded to bfloat16 in the file."""
    wide = load_adapter(train(_cfg(tiny_llama_dir, task_file, tmp_path / "f32", max_steps=3)).path)
    narrow = load_adapter(train(_cfg(tiny_llama_dir, task_file, tmp_path / "b16", max_steps=3,
                                     save_dtype="bfloat16")).path)
    assert narrow.config["training"]["save_dtype"] == "bfloat16"
    assert wide.modules.keys() == narrow.modules.keys()
    for name, md in narrow.modules.items():
        assert md.delta.dtype == torch.bfloat16 and wide.modules[name].delta.dtype == torch.float32
        assert torch.equal(md.index, wide.modules[name].index)
        assert torch.equal(md.delta, wide.modules[name].delta.bfloat16())
    with pytest.raises(InvalidRequestError, match="--save-dtype must be one of"):
        train(_cfg(tiny_llama_dir, task_file, tmp_path / "bad", save_dtype="float16"))


def test_resume_on_another_base_model_is_refused(tiny_llama_dir, task_file, tmp_path):
    """QA: a checkpoint resumed with another --model of the same shapes went on training its deltas on
    that base, and the adapter recorded that base's fingerprint."""
    from s2ft_serve.model.testing import make_tiny_model

    other = make_tiny_model(tmp_path / "other", "llama", seed=5)
    train(_cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=2, save_every=2))
    with pytest.raises(InvalidRequestError, match="another base model"):
        train(_cfg(other, task_file, tmp_path / "out", max_steps=4, resume=True))


def test_resume_with_dropout_equals_uninterrupted_run(tiny_llama_dir, task_file, tmp_path):
    """QA: the random-number state was not saved, so after a resume the dropout masks were not those of
    an uninterrupted run (deltas 0.017 apart)."""
    model = tmp_path / "dropout"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.2}))
    full = train(_cfg(model, task_file, tmp_path / "a", max_steps=4, batch_size=4))
    cut = _cfg(model, task_file, tmp_path / "b", max_steps=4, batch_size=4, save_every=2)
    train(cut)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-4")
    cut.resume = True
    resumed = train(cut)
    for name, layer in full.layers.items():
        torch.testing.assert_close(resumed.layers[name].delta, layer.delta, rtol=0, atol=1e-6)


def test_a_checkpoint_whose_state_was_cut_short_is_skipped(tiny_llama_dir, task_file, tmp_path, caplog):
    """QA: a state.json cut short (a crash while writing it) counted as the latest checkpoint and --resume
    died on it; it is skipped for the one before."""
    cfg = _cfg(tiny_llama_dir, task_file, tmp_path / "out", max_steps=4, save_every=2)
    train(cfg)
    state = tmp_path / "out" / "checkpoints" / "step-4" / "state.json"
    state.write_text(state.read_text()[:40])
    cfg.resume = True
    with caplog.at_level("WARNING"):
        assert train(cfg).steps == 4
    assert "unreadable" in caplog.text
    assert not list((tmp_path / "out" / "checkpoints").rglob("*.tmp"))
    torn = tmp_path / "out" / "checkpoints" / "step-1"  # QA: folders cut short were never removed
    torn.mkdir()
    (torn / "state.json").write_text("{")
    cfg.max_steps = 6
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-4", "step-6"]
    only_torn = tmp_path / "fresh" / "checkpoints" / "step-2"  # and a fresh run counts one (QA: overlooked)
    only_torn.mkdir(parents=True)
    (only_torn / "state.json.tmp").write_text("{")
    with pytest.raises(ConflictError, match="earlier run"):
        train(_cfg(tiny_llama_dir, task_file, tmp_path / "fresh", max_steps=2))
    other = tmp_path / "other" / "checkpoints"  # names that are no checkpoint's (QA: step-² crashed int())
    (other / "step-²").mkdir(parents=True)
    (other / "step-3").write_text("a file")
    assert train(_cfg(tiny_llama_dir, task_file, tmp_path / "other", max_steps=2, save_every=1)).steps == 2


def test_options_checked_before_the_model_loads(tiny_llama_dir, task_file, tmp_path):
    """QA: a seed too large for the data order failed at the first batch; a trainable ratio was refused
    when both per-layer counts made it unused."""
    for field, value in (("seed", 2**62), ("seed", -1), ("heads_per_layer", -1)):
        with pytest.raises(InvalidRequestError, match="--" + field.replace("_", "-")):
            _cfg(tiny_llama_dir, task_file, tmp_path / "o", **{field: value}).validate()
    _cfg(tiny_llama_dir, task_file, tmp_path / "o", trainable_ratio=0).validate()  # unused: both counts given
    with pytest.raises(InvalidRequestError, match="--trainable-ratio"):
        _cfg(tiny_llama_dir, task_file, tmp_path / "o", trainable_ratio=0, heads_per_layer=None).validate()

"""Random adapters for load tests: format v1, the requested budget, reproducible, kept when present."""

from __future__ import annotations

import pytest
import torch

from loadtest.adapters import AdapterBudget, adapter_names, create_adapters
from loadtest.cli import main
from loadtest.errors import LoadtestConfigError
from s2ft_serve.adapters.format import linear_shapes, load_adapter
from s2ft_serve.model.loading import load_model, target_linears


def test_created_adapters_load_and_have_the_budget(tiny_llama_dir, tmp_path):
    names = adapter_names(3)
    folders = create_adapters(tmp_path, names, str(tiny_llama_dir), AdapterBudget(heads=2, channels=5))
    assert [f.name for f in folders] == ["lt-0000", "lt-0001", "lt-0002"]
    loaded = load_model(str(tiny_llama_dir))
    linears = linear_shapes(target_linears(loaded.model))
    adapters = [load_adapter(f, linears, base_fingerprint=loaded.fingerprint) for f in folders]
    head_dim = 16
    for adapter in adapters:
        assert adapter.fingerprint == loaded.fingerprint and adapter.base_model == loaded.name
        for name, module in adapter.modules.items():
            assert module.k == (2 * head_dim if name.endswith("o_proj") else 5)
    assert not torch.equal(adapters[0].modules[next(iter(adapters[0].modules))].delta,
                           adapters[1].modules[next(iter(adapters[1].modules))].delta)


def test_existing_adapters_are_kept_and_versions_differ(tiny_llama_dir, tmp_path):
    (folder,) = create_adapters(tmp_path, ["x"], str(tiny_llama_dir))
    stamp = (folder / "adapter_model.safetensors").stat().st_mtime_ns
    create_adapters(tmp_path, ["x"], str(tiny_llama_dir))
    assert (folder / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    (other,) = create_adapters(tmp_path, ["x--b"], str(tiny_llama_dir), seed_offset=1)
    a, b = load_adapter(folder), load_adapter(other)
    key = next(iter(a.modules))
    assert not torch.equal(a.modules[key].delta, b.modules[key].delta)


def test_make_adapters_cli_in_bfloat16(tiny_llama_dir, tmp_path):
    rc = main(["make-adapters", "--adapter-dir", str(tmp_path), "--model", str(tiny_llama_dir), "--count", "2",
               "--delta-dtype", "bfloat16", "--second-version"])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lt-0000", "lt-0000--b", "lt-0001", "lt-0001--b"]
    adapter = load_adapter(tmp_path / "lt-0001")
    assert {m.delta.dtype for m in adapter.modules.values()} == {torch.bfloat16}


@pytest.mark.parametrize("budget", [AdapterBudget(heads=0, channels=0), AdapterBudget(heads=-1),
                                    AdapterBudget(channels=-2), AdapterBudget(scale=0.0), AdapterBudget(dtype="int8"),
                                    AdapterBudget(heads=99), AdapterBudget(channels=100_000)])
def test_bad_budgets_are_refused(tiny_llama_dir, tmp_path, budget):
    with pytest.raises(LoadtestConfigError):
        create_adapters(tmp_path, ["x"], str(tiny_llama_dir), budget)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("heads, channels, kinds", [(0, 4, {"down_proj"}), (1, 0, {"o_proj"})])
def test_one_kind_of_column_only(tiny_llama_dir, tmp_path, heads, channels, kinds):
    """Channels only (as the S²FT authors' Llama 3 scripts train) or heads only: a valid adapter without
    the other kind's modules."""
    (folder,) = create_adapters(tmp_path, ["x"], str(tiny_llama_dir), AdapterBudget(heads=heads, channels=channels))
    assert {name.rsplit(".", 1)[-1] for name in load_adapter(folder).modules} == kinds


def test_make_adapters_with_a_missing_model_is_one_line(tmp_path, capsys):
    assert main(["make-adapters", "--adapter-dir", str(tmp_path), "--model", str(tmp_path / "nope"),
                 "--count", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s2ft-loadtest: error:") and "nope" in err and len(err.strip().splitlines()) == 1

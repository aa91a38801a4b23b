"""Smoke tests of the experiment scripts at tiny sizes (digits): each runs end to end and writes a
Dataset, figure and table with the dims and attributes the README promises."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tesla_func.experiment import write_outputs
from tesla_func.plots import plot_accuracy_vs_iteration

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TESLA_FUNC_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def ablate():
    return load_script("ablate_labels")


TINY = dict(
    dataset="digits",
    num_experts=1,
    expert_epochs_trained=2,
    width=8,
    iterations=2,
    syn_steps=2,
    expert_epochs=1,
    max_start_epoch=1,
    eval_epochs=2,
)


def assert_provenance(ds):
    for key in ("config", "seed", "git_revision", "device", "version_torch"):
        assert key in ds.attrs


def test_ablate_labels_runs_end_to_end(ablate, tmp_path):
    cfg = ablate.AblateLabelsConfig(
        ipcs=(1, 2), labels=("hard", "sla-only"), eval_every=1, eval_models=1, **TINY
    )
    ds = ablate.main(cfg)
    assert dict(ds.sizes) == {"labels": 2, "ipc": 2, "iteration": 2}
    assert np.isfinite(ds.accuracy.values).all()
    assert (np.diff(ds.best_accuracy.values, axis=-1) >= 0).all()  # best so far never drops
    assert np.isfinite(ds.random_real_accuracy.values).all()
    assert_provenance(ds)
    assert ds.attrs["config"]["labels"] == ("hard", "sla-only")
    text = ablate.table(ds)
    assert "sla-only" in text and "random real" in text
    paths = write_outputs(
        ds,
        "ablate_labels",
        table=text,
        out_dir=tmp_path / "out",
        plot=lambda nc, png: plot_accuracy_vs_iteration(nc, png),
    )
    for path in paths.values():
        assert path.stat().st_size > 0


def test_paper_preset_and_overrides_parse(ablate):
    from tesla_func.experiment import parse_config

    cfg = parse_config(
        ablate.AblateLabelsConfig,
        ablate.PRESETS,
        "",
        ["--preset", "paper", "--ipcs", "1", "--labels", "hard", "sla"],
    )
    assert cfg.dataset == "cifar10" and cfg.width == 128
    assert cfg.ipcs == (1,) and cfg.labels == ("hard", "sla")


def test_main_table_runs_end_to_end(tmp_path):
    main_table = load_script("main_table")
    cfg = main_table.MainTableConfig(
        ipcs=(1, 2), rows=("tesla/hard", "unrolled/hard"), unrolled_max_ipc=1, eval_models=2, **TINY
    )
    ds = main_table.main(cfg)
    assert dict(ds.sizes) == {"row": 3, "ipc": 2, "model": 2}
    assert list(ds.row.values) == ["random/real", "tesla/hard", "unrolled/hard"]
    assert np.isnan(ds.accuracy.sel(row="unrolled/hard", ipc=2)).all()  # above unrolled_max_ipc
    assert np.isfinite(ds.accuracy.sel(row="tesla/hard")).all()
    assert_provenance(ds)
    text = main_table.table(ds)
    assert "random / real" in text and "| - |" in text


def test_cross_arch_runs_end_to_end(tmp_path):
    cross_arch = load_script("cross_arch")
    cfg = cross_arch.CrossArchConfig(
        ipc=1,
        sets=("tesla/hard",),
        archs=("convnet", "vit"),
        vit_dim=8,
        vit_depth=1,
        eval_models=1,
        **TINY,
    )
    ds = cross_arch.main(cfg)
    assert dict(ds.sizes) == {"set": 2, "arch": 2, "model": 1}
    assert np.isfinite(ds.accuracy.values).all()
    assert_provenance(ds)
    assert "tesla / hard" in cross_arch.table(ds)

"""Smoke test of experiments/ablate_labels.py at tiny sizes (digits): it runs end to end and writes
a Dataset, figure and table with the dims and attributes the README promises."""

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


@pytest.fixture
def ablate(monkeypatch, tmp_path):
    monkeypatch.setenv("TESLA_FUNC_CACHE", str(tmp_path / "cache"))
    return load_script("ablate_labels")


def test_ablate_labels_runs_end_to_end(ablate, tmp_path):
    cfg = ablate.AblateLabelsConfig(
        dataset="digits", ipcs=(1, 2), labels=("hard", "sla-only"), num_experts=1,
        expert_epochs_trained=2, width=8, iterations=2, syn_steps=2, expert_epochs=1,
        max_start_epoch=1, eval_every=1, eval_epochs=2, eval_models=1)
    ds = ablate.main(cfg, runs_dir=tmp_path / "runs")
    assert dict(ds.sizes) == {"labels": 2, "ipc": 2, "iteration": 2}
    assert np.isfinite(ds.accuracy.values).all()
    assert (np.diff(ds.best_accuracy.values, axis=-1) >= 0).all()  # best so far never drops
    assert np.isfinite(ds.random_real_accuracy.values).all()
    for key in ("config", "seed", "git_revision", "device", "version_torch"):
        assert key in ds.attrs
    assert ds.attrs["config"]["labels"] == ("hard", "sla-only")
    text = ablate.table(ds)
    assert "sla-only" in text and "random real" in text
    paths = write_outputs(ds, "ablate_labels", table=text, out_dir=tmp_path / "out",
                          plot=lambda nc, png: plot_accuracy_vs_iteration(nc, png))
    for path in paths.values():
        assert path.stat().st_size > 0


def test_paper_preset_and_overrides_parse(ablate):
    from tesla_func.experiment import parse_config

    cfg = parse_config(ablate.AblateLabelsConfig, ablate.PRESETS, "",
                       ["--preset", "paper", "--ipcs", "1", "--labels", "hard", "sla"])
    assert cfg.dataset == "cifar10" and cfg.width == 128
    assert cfg.ipcs == (1,) and cfg.labels == ("hard", "sla")

"""Smoke test of experiments/gradient_fidelity.py at tiny sizes (digits): it runs end to end, the
numbers obey what the proofs say (tesla == exact at T = 1, not at T > 1), and it writes the
Dataset, figures and table with the dims and attributes the README promises."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tesla_func.distill import DistillConfig
from tesla_func.experiment import parse_config
from tesla_func.experts import ExpertConfig
from tesla_func.results import load_results, write_outputs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("gradient_fidelity",
                                                  ROOT / "experiments" / "gradient_fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gradient_fidelity"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(fidelity):
    return fidelity.FidelityConfig(
        experts=ExpertConfig(dataset="digits", num_experts=1, epochs=2, width=8),
        distill=DistillConfig(ipc=1, iterations=2, syn_steps=2, match_epochs=1, max_start_epoch=1,
                              lr_img=100.0, lr_lr=1e-2, eval_epochs=2, eval_models=2),
        ipc=2, batch_syn=10, steps=(1, 3), start_epochs=(0, 1), lrs=(0.01, 0.05), base_steps=3,
        base_start_epoch=0, base_lr=0.01, segments=2, distill_seeds=(0,), threads=1,
        precision_settings=("drawn/crop/half/hard/relu", "drawn/all/full/learned/softplus",
                            "expert/none/half/hard/relu"),
        precision_steps=(1, 2), precision_problems=2, precision_width=4, precision_images=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run(fidelity, cfg, cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESLA_FUNC_CACHE", str(cache))
        return fidelity.main(cfg)


@pytest.fixture(scope="module")
def results(fidelity, tiny, cache):
    return run(fidelity, tiny, cache)


def test_sweeps_are_measured_one_factor_at_a_time(results, tiny):
    ds = results
    assert dict(ds.images_cosine.sizes) == {"steps": 2, "start_epoch": 2, "lr": 2, "segment": 2}
    assert dict(ds.seconds.sizes) == {"method": 2, "steps": 2, "start_epoch": 2, "lr": 2,
                                      "segment": 2}
    assert set(ds.method.values) == {"tesla", "exact"}
    # (1, 0, .01), (3, 0, .01), (3, 1, .01), (3, 0, .05): four points, each on both segments.
    measured = np.isfinite(ds.images_cosine.values)
    assert measured.sum() == len(tiny.points()) * tiny.segments == 4 * 2
    assert measured[:, :, :, 0].sum() == measured[:, :, :, 1].sum()  # the same points per segment
    for name in ("images_relative_error", "lr_relative_error", "lr_sign_agreement", "loss"):
        assert (np.isfinite(ds[name].values) == measured).all(), name


def test_tesla_equals_exact_at_one_step_and_not_beyond(results):
    one = results.sel(steps=1, start_epoch=0, lr=0.01)
    # float64: rounding only (measured: cosine 1 - 2e-16, relative errors 5e-16 and 2e-16)
    np.testing.assert_allclose(one.images_cosine.values, 1.0, rtol=0, atol=1e-10)
    assert (one.images_relative_error.values < 1e-10).all()
    assert (one.lr_relative_error.values < 1e-10).all()
    assert (one.lr_sign_agreement.values == 1).all()
    # T = 3: the dropped Hessian terms are far above float64 rounding.
    three = results.sel(steps=3, start_epoch=0, lr=0.01)
    assert (three.images_relative_error.values > 1e-8).all()
    assert (three.images_cosine.values < 1).all()


def test_distillation_part(results, tiny, fidelity):
    ds = results
    assert dict(ds.accuracy.sizes) == {"set": 3, "seed": 1, "model": 2}
    assert set(ds.set.values) == {"random real", "tesla", "exact"}
    acc = ds.accuracy.values
    assert np.isfinite(acc).all() and ((acc >= 0) & (acc <= 1)).all()
    assert dict(ds.matching_loss.sizes) == {"method": 2, "seed": 1, "iteration": 2}
    assert np.isfinite(ds.matching_loss.values).all() and (ds.learned_lr.values > 0).all()
    # Same seed, same draws: the first matching loss (before any update) is the same for both.
    first = ds.matching_loss.isel(iteration=0)
    np.testing.assert_allclose(first.sel({"method": "tesla"}), first.sel({"method": "exact"}),
                               rtol=1e-6)


def test_precision_part(results, tiny):
    ds = results
    dims = {"setting": 3, "T": 2, "problem": 2, "precision_method": 3}
    assert dict(ds.precision_images_error.sizes) == dims
    assert dict(ds.precision_flips.sizes) == dims
    assert ds.precision_method.values.tolist() == ["unrolled", "tesla", "exact"]
    assert ds.activation.values.tolist() == ["relu", "softplus", "relu"]
    assert ds.source.values.tolist() == ["drawn", "drawn", "expert"]
    errors = ds.precision_images_error
    assert (errors > 0).all() and np.isfinite(errors).all()
    # labels: a gradient error only for learned logits
    labels = ds.precision_labels_error.notnull()
    assert labels.sel(setting="drawn/all/full/learned/softplus").all()
    assert not labels.sel(setting="drawn/crop/half/hard/relu").any()
    # T = 1: tesla is exact, so all three are float32 rounding of one gradient
    assert (errors.sel(T=1) < 1e-4).all()
    # T = 2: tesla's error is its truncation, far above rounding
    assert (errors.sel(T=2, precision_method="tesla") > 1e-3).all()
    # tesla computes the states as exact does: the same flips
    np.testing.assert_array_equal(ds.precision_flips.sel(precision_method="tesla"),
                                  ds.precision_flips.sel(precision_method="exact"))
    assert (ds.precision_flips.diff("T") >= 0).all()  # summed over the first T steps


def test_precision_settings_are_checked(fidelity):
    parsed = fidelity.PrecisionSetting.parse("drawn/color/half/learned/softplus")
    assert parsed.families == ("color",) and parsed.labels == "learned" and not parsed.tf32
    assert fidelity.PrecisionSetting.parse("drawn/none/full/hard/relu").families == ()
    assert fidelity.PrecisionSetting.parse("expert/all/full/hard/relu/tf32").tf32
    with pytest.raises(ValueError, match="source/augment/batch/labels/activation"):
        fidelity.PrecisionSetting.parse("drawn/jitter/full/hard/relu")
    with pytest.raises(ValueError, match="TF32"):
        fidelity.FidelityConfig(precision_settings=("drawn/none/full/hard/relu/tf32",))


def test_distillation_runs_are_cached_and_reused(fidelity, tiny, results, cache):
    """A second call reloads the finished runs: the same accuracies without distilling again."""
    assert len(list((cache / "runs").iterdir())) == 2  # tesla and exact of seed 0
    assert results.attrs["runs_reloaded"] == "0 of 2"
    again = run(fidelity, tiny, cache)
    assert again.attrs["runs_reloaded"] == "2 of 2"
    np.testing.assert_array_equal(again.accuracy.values, results.accuracy.values)
    np.testing.assert_array_equal(again.matching_loss.values, results.matching_loss.values)


def test_outputs_are_written_with_provenance(fidelity, results, tmp_path):
    text = fidelity.table(results)
    notes = fidelity.notes(results)
    assert "random real" in text and "`tesla`" in text and "cosine" in text
    assert notes.startswith("**Finding.**") and "Wall time" in notes
    assert "Float32 against float64" in text and "drawn/crop/half/hard/relu" in text
    assert "**Precision.**" in notes and "median ratio" in notes
    paths = write_outputs(results, fidelity.NAME, tmp_path, table=text, notes=notes,
                          plot=fidelity.plot)
    for path in [*paths.values(), tmp_path / f"{fidelity.NAME}_distill.png",
                 tmp_path / f"{fidelity.NAME}_precision.png"]:
        assert path.stat().st_size > 0, path
    saved = load_results(paths["netcdf"])
    for key in ("config", "seed", "git_revision", "device", "version_torch", "command"):
        assert key in saved.attrs, key
    assert saved.attrs["config"]["steps"] == [1, 3]
    assert saved.attrs["base_point"] == {"steps": 3, "start_epoch": 0, "lr": 0.01}
    assert saved.attrs["measured_dtype"] == "float64"
    assert saved.accuracy.attrs["units"] == "fraction"
    assert "Finding" in paths["table"].read_text()


def test_plot_sweeps_needs_the_base_point(fidelity, results, tmp_path):
    from tesla_func.plots import plot_sweeps
    from tesla_func.results import save_results

    nc = save_results(results.drop_attrs(deep=False), tmp_path / "bare.nc")
    with pytest.raises(KeyError, match="base_point"):
        plot_sweeps(nc, tmp_path / "bare.png", variables=["images_cosine"], sweeps=fidelity.SWEEPS)


def test_paper_preset_and_overrides_parse(fidelity):
    cfg = parse_config(fidelity.FidelityConfig, fidelity.PRESETS, "",
                       ["--preset", "paper", "--steps", "1", "80", "--lrs", "0.001"])
    assert cfg.experts.dataset == "cifar10" and cfg.experts.width == 128
    assert cfg.experts.epochs == 50
    assert cfg.steps == (1, 80) and cfg.lrs == (0.001,)


def test_config_rejects_segments_past_the_trajectory(fidelity):
    with pytest.raises(ValueError, match="checkpoint"):
        fidelity.FidelityConfig(start_epochs=(0, 5))  # 5 + M = 7 > the experts' 6 epochs

"""Smoke tests of the experiment scripts at tiny sizes (digits): each runs end to end and writes a
Dataset, figure and table with the dims and attributes the README promises."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tesla_func.distill import DistillConfig
from tesla_func.experts import ExpertConfig
from tesla_func.results import make_results, save_results, write_outputs

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


EXPERTS = ExpertConfig(dataset="digits", num_experts=1, epochs=2, width=8)
DISTILL = DistillConfig(iterations=2, syn_steps=2, match_epochs=1, max_start_epoch=1,
                        eval_epochs=2)


def assert_provenance(ds):
    for key in ("config", "seed", "git_revision", "device", "version_torch"):
        assert key in ds.attrs


def test_ablate_labels_runs_end_to_end(ablate, tmp_path):
    cfg = ablate.AblateLabelsConfig(
        experts=EXPERTS,
        distill=dataclasses.replace(DISTILL, eval_models=1),
        ipcs=(1, 2),
        label_strategies=("hard", "sla-only"),
        seeds=(0, 1),
    )
    ds = ablate.main(cfg)
    assert dict(ds.sizes) == {"set": 3, "label_strategy": 2, "ipc": 2, "seed": 2,
                              "log_iteration": 2, "class": 10}
    assert list(ds.set.values) == ["hard", "sla-only", "random real"]
    assert np.isfinite(ds.accuracy.values).all()
    assert np.isfinite(ds.val_accuracy.sel(set=["hard", "sla-only"]).values).all()
    assert np.isnan(ds.val_accuracy.sel(set="random real")).all()  # the baseline has none
    # each seed is its own run: other initial images, draws and evaluation networks
    hard = ds.accuracy.sel(set="hard", ipc=2)
    assert hard.sel(seed=0) != hard.sel(seed=1)
    assert ds.beta.dims == ("label_strategy", "ipc", "seed") and (ds.beta > 0).all()
    assert_provenance(ds)
    assert ds.attrs["config"]["label_strategies"] == ("hard", "sla-only")
    text = ablate.table(ds)
    assert "sla-only" in text and "random real" in text and "IPC 2, seeds 0, 1" in text
    notes = ablate.notes(ds)
    assert "across 2 distillation seeds" in notes and "exceed the spread" in notes
    paths = write_outputs(ds, "ablate_labels", tmp_path / "out", table=text, notes=notes,
                          plot=ablate.plot)
    for path in [*paths.values(), tmp_path / "out" / "ablate_labels_drift.png"]:
        assert path.stat().st_size > 0


def test_ablate_labels_names_the_differences_beyond_the_spread(ablate):
    accuracy = np.array([[[0.70, 0.72, 0.71]], [[0.60, 0.61, 0.62]], [[0.69, 0.73, 0.70]]])
    ds = make_results({"accuracy": (("set", "ipc", "seed"), accuracy)},
                      coords={"set": ["hard", "sla", "learned"], "ipc": [1], "seed": [0, 1, 2]})
    text = ablate.differences(ds)
    # hard vs sla: 10 points apart, stds 1: beyond; learned vs hard: within; learned vs sla too
    assert "hard > sla by 10.0" in text and "learned > sla by" in text
    assert "(1 other pairs within the spread)" in text


def test_paper_preset_and_overrides_parse(ablate):
    from tesla_func.experiment import parse_config

    cfg = parse_config(
        ablate.AblateLabelsConfig,
        ablate.PRESETS,
        "",
        ["--preset", "paper", "--ipcs", "1", "--label-strategies", "hard", "sla",
         "--distill.lr-img", "50", "--experts.num-experts", "3"],
    )
    assert cfg.experts.dataset == "cifar10" and cfg.experts.width == 128
    assert cfg.ipcs == (1,) and cfg.label_strategies == ("hard", "sla")
    assert cfg.distill.lr_img == 50.0 and cfg.experts.num_experts == 3
    assert cfg.distill.iterations == ablate.PRESETS["paper"].distill.iterations  # kept


def test_main_table_runs_end_to_end(tmp_path):
    main_table = load_script("main_table")
    cfg = main_table.MainTableConfig(
        experts=EXPERTS,
        distill=dataclasses.replace(DISTILL, eval_models=2),
        ipcs=(1, 2),
        rows=("tesla/hard", "unrolled/hard"),
        seeds=(0, 1),
        unrolled_max_ipc=1,
    )
    ds = main_table.main(cfg)
    assert dict(ds.sizes) == {"row": 3, "ipc": 2, "seed": 2, "iteration": 3}
    assert list(ds.row.values) == ["random/real", "tesla/hard", "unrolled/hard"]
    assert np.isnan(ds.accuracy.sel(row="unrolled/hard", ipc=2)).all()  # above unrolled_max_ipc
    assert np.isfinite(ds.accuracy.sel(row="tesla/hard")).all()
    assert np.isfinite(ds.accuracy.sel(row="random/real")).all()
    # the seeds are different runs: other initial images, draws and evaluation networks
    tesla = ds.sel(row="tesla/hard", ipc=1)
    assert tesla.accuracy.sel(seed=0) != tesla.accuracy.sel(seed=1)
    # beta: the initial value, then one per iteration; collapsed says whether the last is low
    assert (tesla.beta.isel(iteration=0) == 0.01).all() and np.isfinite(tesla.beta).all()
    expected = tesla.beta.isel(iteration=-1) < cfg.collapse_below * tesla.beta.isel(iteration=0)
    np.testing.assert_array_equal(tesla.collapsed.values, expected.values)
    assert np.isnan(ds.collapsed.sel(row="random/real")).all()
    assert_provenance(ds)
    text = main_table.table(ds)
    assert "random / real" in text and "| - |" in text and "seed 1" in text
    assert "collapsed" in text
    notes = main_table.notes(ds)
    assert "across 2 distillation seeds" in notes and "IPC 1: tesla/hard - unrolled/hard" in notes
    paths = write_outputs(ds, "main_table", tmp_path, table=text, notes=notes,
                          plot=main_table.plot)
    for path in (paths["figure"], tmp_path / "main_table_beta.png"):
        assert path.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="distinct"):
        main_table.MainTableConfig(seeds=(0, 0))


def test_cross_arch_runs_end_to_end(tmp_path):
    cross_arch = load_script("cross_arch")
    cross_arch.ARCHS["vit_tiny"] = ("vit", {"patch_size": 4, "dim": 8, "depth": 1, "heads": 2,
                                            "mlp_dim": 8})
    cfg = cross_arch.CrossArchConfig(
        experts=EXPERTS,
        distill=dataclasses.replace(DISTILL, eval_models=1),
        ipcs=(1, 2),
        sets=("tesla/hard",),
        archs=("convnet", "vit_tiny"),
        lr_grid=(0.01, 0.1),
        epochs=2,
        models=2,
        val_images=50,
        test_images=100,
    )
    ds = cross_arch.main(cfg)
    assert dict(ds.accuracy.sizes) == {"set": 2, "ipc": 2, "arch": 2, "lr_choice": 3, "model": 2}
    assert np.isfinite(ds.accuracy.values).all() and np.isfinite(ds.val_accuracy.values).all()
    assert ds.attrs["test_images_used"] == 100
    assert ds.lr.sel(set="random/real", lr_choice="own").values.ravel().tolist() == [0.01] * 4
    # the networks differ (their own initialisations): a spread, not +- 0.0
    assert (ds.accuracy.std("model") > 0).any()
    # random real's own lr is also in the grid: trained once, the same numbers under both names
    real = ds.sel(set="random/real")
    np.testing.assert_array_equal(real.accuracy.sel(lr_choice="own").values,
                                  real.accuracy.sel(lr_choice="grid 0.01").values)
    # the reported lr is the one with the best mean validation accuracy, never the test's
    for name in ds.set.values:
        for ipc in ds.ipc.values:
            for arch in ds.arch.values:
                at = ds.sel(set=name, ipc=ipc, arch=arch)
                best = at.val_accuracy.mean("model").argmax("lr_choice").item()
                assert str(at.chosen.values) == str(at.lr_choice.values[best])
                np.testing.assert_array_equal(at.chosen_accuracy.values,
                                              at.accuracy.isel(lr_choice=best).values)
    assert_provenance(ds)
    text = cross_arch.table(ds)
    assert "tesla / hard" in text and "chosen on validation" in text and "own" in text
    assert "vit_tiny, IPC 1" in text and "vit_tiny, IPC 2" in text
    paths = write_outputs(ds, "cross_arch", tmp_path, table=text, notes=cross_arch.notes(ds),
                          plot=cross_arch.plot)
    assert paths["figure"].read_bytes().startswith(b"\x89PNG")
    # without a grid: the set's own lr only, nothing validated
    own = cross_arch.main(dataclasses.replace(cfg, lr_grid=(), archs=("convnet",), ipcs=(1,)))
    assert own.lr_choice.values.tolist() == ["own"] and (own.chosen == "own").all()
    assert np.isnan(own.val_accuracy).all() and "chosen on validation" not in cross_arch.table(own)
    with pytest.raises(ValueError, match="unknown architectures"):
        cross_arch.CrossArchConfig(archs=("resnet50",))


def test_a_stale_cache_is_never_reused(monkeypatch, tmp_path):
    """Runs and experts are keyed by config *and* by the code, torch, device kind and thread
    count that made them: when any of these changes, the cached run is not found again."""
    import tesla_func.experiment as experiment
    from tesla_func.data import load_dataset

    dataset = load_dataset("digits")
    experts = experiment.ensure_experts(EXPERTS, progress=False)
    run = experiment.distill_run(DISTILL, experts, ipc=1, batch_syn_max=10, num_classes=10,
                                 eval_models=1)
    first = experiment.distill_cached(run, dataset)
    assert experiment.run_dir(run) == first.out and (first.out / "key.json").exists()
    again = experiment.distill_cached(run, dataset)  # the same key: reloaded, not re-run
    assert again.out == first.out and again.last_eval is None
    real = experiment.cache_fingerprint
    monkeypatch.setattr(experiment, "cache_fingerprint",
                        lambda device="cpu": {**real(device), "code": "edited"})
    assert experiment.run_dir(run) != first.out
    assert experiment.experts_dir(EXPERTS) != experts
    with experiment.torch_threads(2):
        monkeypatch.setattr(experiment, "cache_fingerprint", real)
        assert experiment.run_dir(run) != first.out  # another thread count


def test_the_cache_fingerprint_covers_the_subpackages(monkeypatch, tmp_path):
    """An edit anywhere in the library, a subpackage's module included (data/, planner/, ...),
    gives cached experts and runs another key."""
    import shutil

    from tesla_func import experiment

    copy = tmp_path / "tesla_func"
    shutil.copytree(Path(experiment.__file__).parent, copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(experiment, "__file__", str(copy / "experiment.py"))
    before = experiment.cache_fingerprint()["code"]
    assert experiment.cache_fingerprint()["code"] == before  # a pure function of the files
    with open(copy / "data" / "defaults.py", "a") as f:
        f.write("\n# an edit\n")
    assert experiment.cache_fingerprint()["code"] != before


def test_ablate_labels_measures_label_drift_and_draws_its_sets(ablate, tmp_path, monkeypatch):
    from tesla_func import experiment

    monkeypatch.setattr(experiment, "RESULTS_DIR", tmp_path / "results")
    argv = ["--experts.dataset", "digits", "--experts.num-experts", "1", "--experts.epochs", "2",
            "--experts.width", "8", "--distill.iterations", "2", "--distill.syn-steps", "2",
            "--distill.match-epochs", "1", "--distill.max-start-epoch", "1",
            "--distill.eval-every", "0", "--distill.eval-epochs", "1",
            "--distill.eval-models", "1", "--distill.snapshot-every", "1", "--ipcs", "2",
            "--label-strategies", "hard", "sla", "--seeds", "3", "--threads", "1"]
    ds = experiment.run_experiment("ablate_labels", ablate.AblateLabelsConfig, ablate.PRESETS,
                                   "", ablate.main, ablate.table, ablate.plot, notes=ablate.notes,
                                   argv=argv, sets=ablate.plot_sets)
    assert ds.label_drift.dims == ("label_strategy", "ipc", "seed", "log_iteration")
    assert ds.class_count.dims == ("label_strategy", "ipc", "seed", "log_iteration", "class")
    assert ds.seed.values.tolist() == [3]
    assert "(one run)" in (tmp_path / "results" / "ablate_labels" / "ablate_labels.md").read_text()
    assert (ds.label_drift.sel(label_strategy="hard") == 0).all()
    assert (ds.class_count.sum("class") == 20).all()  # 2 images x 10 classes, every iteration
    assert (ds.class_count.sel(label_strategy="hard") == 2).all()
    assert sorted(ds.attrs["synthetic_sets"]) == ["hard, IPC 2", "sla, IPC 2"]
    assert ds.attrs["strip_run"].endswith(Path(ds.attrs["synthetic_sets"]["hard, IPC 2"])
                                          .parent.name)
    out = tmp_path / "results" / "ablate_labels"
    for name in ("ablate_labels", "ablate_labels_drift", "ablate_labels_sets",
                 "ablate_labels_strip"):
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG"), name


def test_label_drift_figure(ablate, tmp_path):
    steps, k = 5, 3
    drift = np.zeros((2, 2, steps))
    drift[1] = np.linspace(0, 0.5, steps)
    counts = np.full((2, 2, steps, k), 2.0)
    counts[1, 1, :, 0], counts[1, 1, :, 1] = [2, 3, 4, 5, 6], [2, 1, 0, 0, 0]  # ipc 2: N = 6
    counts[1, 1, :, 2] = 6 - counts[1, 1, :, 0] - counts[1, 1, :, 1]
    counts[:, 0] /= 2  # ipc 1
    ds = make_results(
        {"label_drift": (("label_strategy", "ipc", "log_iteration"), drift,
                         {"units": "fraction"}),
         "class_count": (("label_strategy", "ipc", "log_iteration", "class"), counts)},
        coords={"label_strategy": ["hard", "sla"], "ipc": [1, 2],
                "log_iteration": np.arange(1, steps + 1), "class": np.arange(k),
                "class_name": (("class",), ["ant", "bee", "cat"])},
    )
    nc = save_results(ds, tmp_path / "drift.nc")
    fig = ablate.plot_label_drift(nc, tmp_path / "drift.png")
    assert (tmp_path / "drift.png").read_bytes().startswith(b"\x89PNG")
    left, middle, right = fig.axes[:3]
    sla_max = [line for line in middle.get_lines() if line.get_label() == "sla max"][0]
    assert list(sla_max.get_ydata()) == [2, 3, 4, 5, 6]  # at the last IPC, 2
    assert [t.get_text() for t in right.get_yticklabels()] == ["ant", "bee", "cat"]
    np.testing.assert_array_equal(right.get_images()[0].get_array(), counts[1, 1].T)
    assert "sla" in right.get_title()
    with pytest.raises(KeyError, match="needs dims"):
        ablate.plot_label_drift(nc, tmp_path / "x.png", x="iteration")


def test_paper_memory_experiment_runs_end_to_end(tmp_path):
    script = load_script("paper_memory")
    cfg = script.PaperMemoryConfig(steps=(1, 2), steps_dataset="digits", datasets=("digits",),
                                   dataset_steps=(1, 2), width=2, batch_syn=4, dsa=False,
                                   device_memory="1GiB", verify_max_steps=3)
    ds = script.main(cfg)
    assert ds["steps_total_bytes"].dims == ("method", "steps")
    assert ds["dataset_total_bytes"].dims == ("dataset", "method", "dataset_steps")
    public = ds["steps_public_tesla_bytes"].values
    assert (public > ds["steps_total_bytes"].sel({"method": "tesla"}).values).all()
    text = script.table(ds)
    assert "| 2 |" in text and "| digits | convnet, IPC 1 | 2 |" in text
    paths = write_outputs(ds, "paper_memory", table=text, out_dir=tmp_path,
                          plot=script.plot_memory_plan)
    assert paths["figure"].read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="compares unrolled, tesla and exact"):
        script.main(script.PaperMemoryConfig(methods=("tesla",)))

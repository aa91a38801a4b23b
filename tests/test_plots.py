"""Figures (tesla_func.plots): each one is drawn from a saved file and written as a PNG."""

from __future__ import annotations

import matplotlib as mpl
import numpy as np
import pytest
import torch

from tesla_func import plots
from tesla_func.results import make_results, save_results

PNG = b"\x89PNG\r\n\x1a\n"


def _written(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG)


@pytest.fixture
def accuracy_file(tmp_path):
    rng = np.random.default_rng(0)
    ds = make_results(
        {
            "accuracy": (
                ("method", "labels", "iteration", "model"),
                rng.random((2, 2, 4, 3)),
                {"units": "fraction"},
            )
        },
        coords={
            "method": ["mtt", "tesla"],
            "labels": ["hard", "soft"],
            "iteration": [0, 10, 20, 30],
            "model": np.arange(3),
        },
    )
    return save_results(ds, tmp_path / "acc.nc")


def test_accuracy_vs_iteration(accuracy_file, tmp_path):
    fig = plots.plot_accuracy_vs_iteration(accuracy_file, tmp_path / "out" / "acc.png")
    assert _written(tmp_path / "out" / "acc.png")
    ax = fig.axes[0]
    assert ax.get_ylabel().startswith("accuracy (%)")
    # 4 mean lines and 4 best-so-far lines, non-decreasing
    best = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(best) == 4
    assert all(np.all(np.diff(line.get_ydata()) >= 0) for line in best)


def test_scaling(tmp_path):
    rng = np.random.default_rng(1)
    variables = {
        v: (("method", "steps", "repeat"), rng.random((3, 4, 2)) * 1e8)
        for v in ("time_s", "peak_bytes", "rss_bytes")
    }
    ds = make_results(
        variables,
        coords={
            "method": ["unrolled", "tesla", "exact"],
            "steps": [5, 10, 20, 40],
            "repeat": [0, 1],
        },
    )
    path = save_results(ds, tmp_path / "bench.nc")
    fig = plots.plot_scaling(path, tmp_path / "scaling.png")
    assert _written(tmp_path / "scaling.png") and len(fig.axes) == 2
    fig = plots.plot_scaling(path, tmp_path / "time_only.png", memory_vars=("absent",))
    assert _written(tmp_path / "time_only.png") and len(fig.axes) == 1
    with pytest.raises(KeyError, match="time_s"):
        plots.plot_scaling(path, tmp_path / "none.png", time_var="wall", memory_vars=())


def test_bar(tmp_path):
    acc = np.array([[[0.1, 0.2], [0.3, 0.5]], [[0.4, 0.4], [0.6, 0.8]]])  # (method, ipc, model)
    ds = make_results(
        {"accuracy": (("method", "ipc", "model"), acc, {"units": "fraction"})},
        coords={"method": ["random", "tesla"], "ipc": [1, 10], "model": [0, 1]},
    )
    path = save_results(ds, tmp_path / "table.nc")
    fig = plots.plot_bar(path, tmp_path / "bar.png")
    assert _written(tmp_path / "bar.png")
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == sorted(["15.0±5.0", "40.0±10.0", "40.0±0.0", "70.0±10.0"])
    with pytest.raises(ValueError, match="neither x, hue nor replicates"):
        plots.plot_bar(path, tmp_path / "bad.png", x=None)


def test_grid_images(tmp_path):
    images = torch.randn(12, 3, 8, 8)
    fig = plots.grid_images(
        images, torch.arange(12) % 10, tmp_path / "grid.png", mean=[0.5] * 3, std=[0.2] * 3
    )
    assert _written(tmp_path / "grid.png")
    assert [ax.get_title() for ax in fig.axes[:3]] == ["0", "1", "2"]
    plots.grid_images(
        images[:5, :1].numpy(), ["a", "b", "c", "d", "e"], tmp_path / "grey.png", ncols=2
    )
    assert _written(tmp_path / "grey.png")
    with pytest.raises(ValueError, match="labels"):
        plots.grid_images(images, [0, 1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="C in"):
        plots.grid_images(torch.zeros(2, 2, 8, 8), [0, 1], tmp_path / "x.png")


def test_missing_variable_is_named(accuracy_file, tmp_path):
    with pytest.raises(KeyError, match="loss"):
        plots.plot_accuracy_vs_iteration(accuracy_file, tmp_path / "x.png", var="loss")
    with pytest.raises(KeyError, match="'epoch'"):
        plots.plot_accuracy_vs_iteration(accuracy_file, tmp_path / "x.png", x="epoch")


def test_plots_leave_matplotlib_global_state_alone(accuracy_file, tmp_path):
    before = dict(mpl.rcParams)
    backend = mpl.get_backend()
    plots.plot_accuracy_vs_iteration(accuracy_file, tmp_path / "acc.png")
    plots.plot_bar(
        accuracy_file, tmp_path / "bar.png", x="iteration", replicate=("model", "labels")
    )
    assert mpl.get_backend() == backend
    changed = {k for k in before if before[k] != mpl.rcParams[k] and k != "backend"}
    assert not changed

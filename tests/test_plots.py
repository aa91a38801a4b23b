"""Figures (tesla_func.plots): each one is drawn from a saved file and written as a PNG."""

from __future__ import annotations

import matplotlib as mpl
import numpy as np
import pytest
import torch

from tesla_func import plots
from tesla_func.data import load_dataset
from tesla_func.results import make_results, save_results
from tesla_func.synthetic import SyntheticSet, snapshot_path

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


# ----------------------------------------------------------------------------------------------
# Pictures of synthetic sets


INFO = {  # a dataset_info as a synthetic-set header records it: 3 grey classes of 6x6 images
    "name": "digits", "num_classes": 3, "channels": 1, "image_size": 6,
    "class_names": ["ant", "bee", "cat"], "mean": [0.25], "std": [0.5], "zca": False,
    "zca_eps": None, "source": "scikit-learn",
}


def _set(path, labels, ipc=2, images=None, iteration=7, info=INFO):
    """A saved set of 3 classes x ``ipc`` images; returns it."""
    n = 3 * ipc
    if images is None:
        images = torch.linspace(-1, 2, n * 36).reshape(n, 1, 6, 6)
    header = {"config": {"method": "exact", "label_strategy": "sla", "ipc": ipc},
              "iteration": iteration, "dataset_info": info}
    synthetic = SyntheticSet(images, labels, 0.02, None, header)
    synthetic.save(path)
    return synthetic


def _soft(classes, k=3, wrong=()):
    """(N, K) probabilities: 0.7 on the class, 0.15 on the others; rows in ``wrong`` put 0.7 on
    the next class instead."""
    top = classes.clone()
    for i in wrong:
        top[i] = (top[i] + 1) % k
    return 0.15 + 0.55 * torch.nn.functional.one_hot(top, k).double()


def _mosaic_of(fig):
    (ax,) = fig.axes
    (image,) = ax.get_images()
    return ax, np.asarray(image.get_array())


def test_plot_synthetic_one_row_per_class_in_pixels(tmp_path):
    classes = torch.arange(3).repeat_interleave(2)
    synthetic = _set(tmp_path / "run" / "synthetic.safetensors", _soft(classes, wrong=[3]))
    fig = plots.plot_synthetic(tmp_path / "run" / "synthetic.safetensors")
    png = tmp_path / "run" / "synthetic.png"  # the default: beside the file, <stem>.png
    assert _written(png)
    from PIL import Image

    size = np.array([fig.get_figwidth(), fig.get_figheight()]) * 120  # inches at 120 dpi
    assert np.abs(np.array(Image.open(png).size) - size).max() <= 1
    ax, canvas = _mosaic_of(fig)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ant", "bee", "cat"]
    # 3 rows x 2 tiles of 6 px: a 1 px gap between tiles, room for two caption lines under them.
    assert canvas.shape == (3 * (6 + 3), 2 * (6 + 1) - 1, 3)
    pixels = (synthetic.images.double() * 0.5 + 0.25).clamp(0, 1)  # normalisation undone
    for i in range(6):
        row, col = divmod(i, 2)
        tile = canvas[row * 9 : row * 9 + 6, col * 7 : col * 7 + 6]
        np.testing.assert_allclose(tile, pixels[i, 0, :, :, None].expand(6, 6, 3).numpy())
    captions = [t for t in ax.texts]
    assert [t.get_text() for t in captions] == [
        "ant\n0.70", "ant\n0.70", "bee\n0.70", "cat\n0.70", "cat\n0.70", "cat\n0.70"]
    red = [i for i, t in enumerate(captions) if t.get_color() == "crimson"]
    assert red == [3]  # image 3 started in class bee; its top class is cat
    assert "exact, sla, IPC 2, iteration 7" in ax.get_title()


def test_plot_synthetic_hard_labels_have_no_captions_and_large_sets_are_cut(tmp_path):
    _set(tmp_path / "hard.safetensors", torch.arange(3).repeat_interleave(4), ipc=4)
    fig = plots.plot_synthetic(tmp_path / "hard.safetensors", tmp_path / "out.png",
                               max_classes=2, max_per_class=3)
    assert _written(tmp_path / "out.png")
    ax, canvas = _mosaic_of(fig)
    assert not ax.texts and canvas.shape == (2 * (6 + 1), 3 * (6 + 1) - 1, 3)
    title = " ".join(ax.get_title().split())
    assert "first 3 of 4 images of the first 2 of 3 classes" in title
    with pytest.raises(ValueError, match="max_classes and max_per_class must be >= 1"):
        plots.plot_synthetic(tmp_path / "hard.safetensors", tmp_path / "x.png", max_classes=0)
    with pytest.raises(ValueError, match="out_png is required"):
        plots.plot_synthetic(SyntheticSet(torch.zeros(3, 1, 6, 6), torch.arange(3), 0.1, None,
                                          {"dataset_info": INFO}))


def test_zca_sets_are_drawn_in_pixels_or_say_they_are_whitened(tmp_path):
    digits = load_dataset("digits", zca=True)
    images = digits.train_images[:10]
    info = digits.info.to_dict()
    _set(tmp_path / "zca.safetensors", torch.arange(10), ipc=1, images=images, info=info)
    # The header names digits with ZCA: it is reloaded and the whitening refitted.
    raw = digits.to_pixels(images).clamp(0, 1)
    for dataset in (None, digits):
        fig = plots.plot_synthetic(tmp_path / "zca.safetensors", tmp_path / "zca.png",
                                   dataset=dataset)
        _, canvas = _mosaic_of(fig)
        np.testing.assert_allclose(canvas[:8, :8, 0], raw[0, 0].numpy(), atol=1e-5)
        assert "whitened" not in fig.axes[0].get_title()
    # A folder dataset that is gone: the whitened images, scaled, with a title that says so.
    gone = {**info, "name": "folder", "source": str(tmp_path / "gone")}
    _set(tmp_path / "gone.safetensors", torch.arange(10), ipc=1, images=images, info=gone)
    fig = plots.plot_synthetic(tmp_path / "gone.safetensors", tmp_path / "gone.png")
    ax, canvas = _mosaic_of(fig)
    assert "ZCA-whitened, shown min-max scaled per image: dataset 'folder'" in " ".join(
        ax.get_title().split())
    assert canvas[:8, :8].min() == 0 and canvas[:8, :8].max() == 1
    # A dataset given that is not the set's is refused.
    with pytest.raises(ValueError, match="another dataset"):
        plots.plot_synthetic(tmp_path / "zca.safetensors", tmp_path / "x.png",
                             dataset=load_dataset("digits"))


def test_sets_side_by_side_share_one_scale(tmp_path):
    classes = torch.arange(3).repeat_interleave(2)
    files = {"hard": tmp_path / "hard.safetensors", "soft": tmp_path / "soft.safetensors"}
    _set(files["hard"], classes)
    _set(files["soft"], _soft(classes))
    fig = plots.plot_synthetic_sets(files, tmp_path / "sets.png", title="two sets")
    assert _written(tmp_path / "sets.png") and len(fig.axes) == 2
    shapes = [np.asarray(ax.get_images()[0].get_array()).shape for ax in fig.axes]
    assert shapes[0] == shapes[1]  # the hard set leaves the caption room the soft one needs
    sizes = [ax.get_position().size for ax in fig.axes]
    np.testing.assert_allclose(sizes[0], sizes[1])
    assert fig.axes[0].get_title().startswith("hard\n") and not fig.axes[0].texts
    with pytest.raises(ValueError, match="no synthetic sets"):
        plots.plot_synthetic_sets({}, tmp_path / "none.png")


def test_experiment_sets_are_named_by_the_results_file(tmp_path):
    classes = torch.arange(3).repeat_interleave(2)
    sets = {}
    for name in ("a", "b", "c"):
        sets[name] = str(tmp_path / f"{name}.safetensors")
        _set(sets[name], classes)
    ds = make_results({"x": (("i",), np.zeros(2))}, coords={"i": [0, 1]}, synthetic_sets=sets)
    nc = save_results(ds, tmp_path / "exp.nc")
    fig = plots.plot_experiment_sets(nc, tmp_path / "exp_sets.png")
    assert _written(tmp_path / "exp_sets.png") and len(fig.axes) == 3
    fig = plots.plot_experiment_sets(nc, tmp_path / "two.png", keys=["c", "a"])
    assert [ax.get_title().split("\n")[0] for ax in fig.axes] == ["c", "a"]
    with pytest.raises(KeyError, match=r"no sets \['d'\]"):
        plots.plot_experiment_sets(nc, tmp_path / "x.png", keys=["d"])
    bare = save_results(make_results({"x": (("i",), np.zeros(2))}), tmp_path / "bare.nc")
    with pytest.raises(KeyError, match="synthetic_sets"):
        plots.plot_experiment_sets(bare, tmp_path / "x.png")


def test_image_strip_rows_are_iterations(tmp_path):
    classes = torch.arange(3).repeat_interleave(2)
    for it in (0, 5, 10, 15):
        images = torch.full((6, 1, 6, 6), it / 15 * 2 - 0.5)  # pixels it / 15 after undoing
        _set(snapshot_path(tmp_path, it), _soft(classes), images=images, iteration=it)
    fig = plots.plot_image_strip(tmp_path, tmp_path / "strip.png", iterations=[0, 10, 15])
    assert _written(tmp_path / "strip.png")
    ax, canvas = _mosaic_of(fig)
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "iteration 0", "iteration 10", "iteration 15"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ant", "bee", "cat"]
    assert canvas.shape == (3 * 9, 3 * 7 - 1, 3)
    for row, it in enumerate((0, 10, 15)):
        np.testing.assert_allclose(canvas[row * 9, 0, 0], it / 15, atol=1e-6)
    assert len(ax.texts) == 9  # soft labels: top class under every image
    # Default: every snapshot up to 6; a list of files works as well as the run folder.
    fig = plots.plot_image_strip([snapshot_path(tmp_path, i) for i in (15, 0)],
                                 tmp_path / "two.png", images=[1, 4])
    ax, _ = _mosaic_of(fig)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["iteration 0", "iteration 15"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ant #1", "cat #0"]
    with pytest.raises(ValueError, match=r"no snapshot at iterations \[7\]"):
        plots.plot_image_strip(tmp_path, tmp_path / "x.png", iterations=[7])
    with pytest.raises(ValueError, match="image indices"):
        plots.plot_image_strip(tmp_path, tmp_path / "x.png", images=[6])
    with pytest.raises(FileNotFoundError, match="snapshot_every > 0"):
        plots.plot_image_strip(tmp_path / "empty", tmp_path / "x.png")

"""Pictures of synthetic sets, drawn from their saved files (``synthetic.safetensors``, snapshots):
the images turned back into pixels from the file's own ``dataset_info``."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from tesla_func.data import Dataset, pixels_from_info
from tesla_func.plots.style import save_png
from tesla_func.results import load_results
from tesla_func.synthetic import (
    SNAPSHOTS,
    SyntheticSet,
    class_layout,
    load_synthetic,
    snapshot_paths,
)

# Each set is drawn as one mosaic image on one Axes (one imshow, not one Axes per image, so a
# figure of several 100-image sets draws in about a second), with axes placed by hand in inches.

_TILE_IN = 0.55  # inches per image side
_LABEL_IN = 1.05  # room left of a mosaic for the row labels (class names)
_MIN_COLUMN_IN = 3.4  # a narrow set (IPC 1) is centred in a column this wide, for its title
_TITLE_IN = 0.12  # room above a mosaic for its title, plus _LINE_IN per line of it
_LINE_IN = 0.16
_BOTTOM_IN = 0.25  # room below a mosaic for column labels
_NAME_CHARS = 10  # class names in captions are cut to this many characters


@dataclass(frozen=True)
class _Mosaic:
    """A grid of images ready to draw: rows x columns of tiles, with what is written around them."""

    tiles: np.ndarray  # (R, M, C, H, W) in [0, 1]
    row_labels: list[str]  # R
    col_labels: list[str] | None  # M, under the columns
    captions: list[list[str | None]] | None  # (R, M) text under each tile
    off_class: np.ndarray | None  # (R, M) bool: the caption names another class than the row's
    title: str
    caption_room: bool | None = None  # leave room for captions (None: where there are some)

    def size_in(self) -> tuple[float, float]:
        """(width, height) of the mosaic itself in inches."""
        cell_w, cell_h, _, _ = self.cells()
        r, m, _, h, _ = self.tiles.shape
        scale = _TILE_IN / h
        return m * cell_w * scale, r * cell_h * scale

    def cells(self) -> tuple[int, int, int, int]:
        """(cell width, cell height, horizontal gap, room for a caption) in image pixels."""
        _, _, _, h, w = self.tiles.shape
        gap = max(1, round(0.08 * w))
        roomy = self.captions is not None if self.caption_room is None else self.caption_room
        room = round(0.55 * h) if roomy else gap
        return w + gap, h + room, gap, room


def _short(name: str) -> str:
    return name if len(name) <= _NAME_CHARS else name[: _NAME_CHARS - 1] + "…"


def _display(pixels: Tensor, scaled: bool) -> np.ndarray:
    """(N, C, H, W) -> numpy in [0, 1]: clipped pixels, or min-max scaled per image (``scaled``:
    whitened images, which have no pixel scale)."""
    arr = pixels.detach().cpu().to(torch.float64).numpy()
    if not scaled:
        return arr.clip(0.0, 1.0)
    lo = arr.min(axis=(1, 2, 3), keepdims=True)
    hi = arr.max(axis=(1, 2, 3), keepdims=True)
    return (arr - lo) / np.where(hi > lo, hi - lo, 1.0)


def _load_set(synthetic: SyntheticSet | str | Path) -> tuple[SyntheticSet, str]:
    if isinstance(synthetic, SyntheticSet):
        return synthetic, "the synthetic set"
    return load_synthetic(synthetic), str(synthetic)


def _pixels_of(synthetic: SyntheticSet, dataset: Dataset | None,
               root: str | Path | None) -> tuple[np.ndarray, str]:
    """The set's images as displayable pixels (N, C, H, W) and a note ('' for real pixels)."""
    info = synthetic.header["dataset_info"]
    pixels, note = pixels_from_info(synthetic.images.float(), info, dataset=dataset, root=root)
    return _display(pixels, scaled=bool(note)), note


def _top_classes(synthetic: SyntheticSet) -> tuple[np.ndarray, np.ndarray] | None:
    """(N,) top class and (N,) its probability, for sets with (N, K) probability labels."""
    if synthetic.labels.dim() != 2:
        return None
    probs = synthetic.labels.detach().cpu().to(torch.float64)
    top = probs.max(dim=1)
    return top.indices.numpy(), top.values.numpy()


def _caption(names: list[str], top: int, prob: float) -> str:
    return f"{_short(names[top])}\n{prob:.2f}"


def _describe(synthetic: SyntheticSet) -> str:
    """'tesla, sla, IPC 10, iteration 40, lr 0.0123' from the header (what it has of it)."""
    config, header = synthetic.header.get("config") or {}, synthetic.header
    parts = [str(config[k]) for k in ("method", "label_strategy") if k in config]
    if "ipc" in config:
        parts.append(f"IPC {config['ipc']}")
    if "iteration" in header:
        parts.append(f"iteration {header['iteration']}")
    parts.append(f"lr {synthetic.lr:.3g}")
    return ", ".join(parts)


def _set_mosaic(
    synthetic: SyntheticSet | str | Path,
    *,
    dataset: Dataset | None = None,
    root: str | Path | None = None,
    title: str | None = None,
    max_classes: int = 20,
    max_per_class: int = 20,
) -> _Mosaic:
    """One row per class (its images in order), soft labels' top class and probability under
    each image (red: another class than the row's)."""
    if min(max_classes, max_per_class) < 1:
        raise ValueError(f"max_classes and max_per_class must be >= 1, got {max_classes} and "
                         f"{max_per_class}")
    synthetic, where = _load_set(synthetic)
    k, ipc, names = class_layout(synthetic, where)
    pixels, note = _pixels_of(synthetic, dataset, root)
    rows, cols = min(k, max_classes), min(ipc, max_per_class)
    index = np.arange(rows)[:, None] * ipc + np.arange(cols)[None, :]  # (R, M) class-major
    top = _top_classes(synthetic)
    captions = off = None
    if top is not None:
        captions = [[_caption(names, top[0][i], top[1][i]) for i in row] for row in index]
        off = top[0][index] != np.arange(rows)[:, None]
    text = title if title is not None else _describe(synthetic)
    if rows < k or cols < ipc:
        text += f"\n(first {cols} of {ipc} images of the first {rows} of {k} classes)"
    if note:
        text += "\n" + note
    return _Mosaic(pixels[index], names[:rows], None, captions, off, text)


def _wrapped_title(mosaic: _Mosaic, width_in: float) -> str:
    """The title wrapped to about what fits in ``width_in`` inches at 8 pt."""
    chars = max(20, int(width_in * 72 / 4.4))  # 8 pt letters are about 4.4 pt wide
    return "\n".join(textwrap.fill(line, chars) for line in mosaic.title.split("\n"))


def _title_lines(mosaic: _Mosaic, width_in: float) -> int:
    return _wrapped_title(mosaic, width_in).count("\n") + 1


def _draw_mosaic(ax: Any, mosaic: _Mosaic, width_in: float) -> None:
    """Draw ``mosaic`` on ``ax`` (an Axes of the mosaic's own aspect)."""
    r, m, c, h, w = mosaic.tiles.shape
    cell_w, cell_h, gap, room = mosaic.cells()
    canvas = np.ones((r * cell_h, m * cell_w - gap, 3))  # white between the tiles
    for i in range(r):
        for j in range(m):
            tile = mosaic.tiles[i, j].transpose(1, 2, 0)  # (H, W, C)
            canvas[i * cell_h : i * cell_h + h, j * cell_w : j * cell_w + w] = (
                np.repeat(tile, 3, axis=2) if c == 1 else tile
            )
    ax.imshow(canvas, interpolation="nearest", vmin=0, vmax=1)
    ax.set_yticks([i * cell_h + (h - 1) / 2 for i in range(r)], mosaic.row_labels, fontsize=7)
    if mosaic.col_labels is not None:
        ax.set_xticks([j * cell_w + (w - 1) / 2 for j in range(m)], mosaic.col_labels, fontsize=6)
    else:
        ax.set_xticks([])
    ax.tick_params(length=0, pad=2)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if mosaic.captions is not None:
        for i in range(r):
            for j in range(m):
                if mosaic.captions[i][j] is not None:
                    ax.text(j * cell_w + (w - 1) / 2, i * cell_h + h, mosaic.captions[i][j],
                            ha="center", va="top", fontsize=5, linespacing=1.0,
                            color="crimson" if mosaic.off_class[i, j] else "black")
    ax.set_title(_wrapped_title(mosaic, width_in), fontsize=8)


def _mosaic_figure(mosaics: Sequence[_Mosaic], ncols: int, title: str | None) -> Figure:
    """The mosaics in a grid of ``ncols`` columns, each column as wide as its widest mosaic."""
    n = len(mosaics)
    nrows = math.ceil(n / ncols)
    sizes = [m.size_in() for m in mosaics]
    col_w = [max(_MIN_COLUMN_IN, max(sizes[i][0] for i in range(j, n, ncols)) + _LABEL_IN)
             for j in range(ncols)]
    offset = [max(_LABEL_IN, (col_w[i % ncols] - w) / 2) for i, (w, _) in enumerate(sizes)]
    room = [2 * min(offset[i] + w / 2, col_w[i % ncols] - offset[i] - w / 2) - 0.1
            for i, (w, _) in enumerate(sizes)]  # the title is centred on its mosaic
    title_in = [max(_LINE_IN * _title_lines(m, room[i])
                    for i, m in enumerate(mosaics) if i // ncols == k) for k in range(nrows)]
    row_h = [max(sizes[i][1] for i in range(k * ncols, min(n, (k + 1) * ncols)))
             + _TITLE_IN + title_in[k] + _BOTTOM_IN for k in range(nrows)]
    top_in = 0.45 if title else 0.1
    width, height = sum(col_w) + 0.2, sum(row_h) + top_in
    fig = Figure(figsize=(width, height))
    for i, (mosaic, (w, h)) in enumerate(zip(mosaics, sizes)):
        row, col = divmod(i, ncols)
        left = sum(col_w[:col]) + offset[i]  # centred in its column where the labels allow
        bottom = height - top_in - sum(row_h[:row]) - _TITLE_IN - title_in[row] - h  # top-aligned
        ax = fig.add_axes((left / width, bottom / height, w / width, h / height))
        _draw_mosaic(ax, mosaic, room[i])
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    return fig


def plot_synthetic(
    synthetic: SyntheticSet | str | Path,
    out_png: str | Path | None = None,
    *,
    dataset: Dataset | None = None,
    root: str | Path | None = None,
    title: str | None = None,
    max_classes: int = 20,
    max_per_class: int = 20,
) -> Figure:
    """A saved synthetic set as pixels: one row per class, its images in order.

    synthetic: a ``synthetic.safetensors`` (or snapshot) path, or a :class:`SyntheticSet`;
    out_png: default ``<file stem>.png`` beside the file (required for a set in memory).
    The normalisation is undone from the header's ``dataset_info``
    (:func:`tesla_func.data.pixels_from_info`): mean/std directly; ZCA with ``dataset`` if given,
    else the dataset the header names, reloaded (``root``: where its files are) to refit the
    whitening. If that dataset is not found, the whitened images are shown min-max scaled with a
    title saying so. Sets with soft or learned labels show each image's top class and its
    probability under it, in red where it is not the row's class. Only the first
    ``max_classes`` classes and ``max_per_class`` images of each are drawn (the title says so).
    """
    if out_png is None:
        if isinstance(synthetic, SyntheticSet):
            raise ValueError("out_png is required for a set that is not read from a file")
        out_png = Path(synthetic).with_suffix(".png")
    mosaic = _set_mosaic(synthetic, dataset=dataset, root=root, title=title,
                         max_classes=max_classes, max_per_class=max_per_class)
    fig = _mosaic_figure([mosaic], 1, None)
    save_png(fig, out_png)
    return fig


def set_grid(
    synthetic: SyntheticSet | str | Path,
    *,
    dataset: Dataset | None = None,
    root: str | Path | None = None,
    max_classes: int = 20,
    max_per_class: int = 20,
    pad: int = 1,
) -> np.ndarray:
    """The set's pixels as one (C, H', W') image in [0, 1], one row per class with white ``pad``
    pixels between the tiles: the tiles :func:`plot_synthetic` draws, without its text (for
    image loggers such as TensorBoard's)."""
    tiles = _set_mosaic(synthetic, dataset=dataset, root=root, max_classes=max_classes,
                        max_per_class=max_per_class).tiles  # (R, M, C, H, W)
    r, m, c, h, w = tiles.shape
    grid = np.ones((c, r * (h + pad) - pad, m * (w + pad) - pad), dtype=np.float32)
    for i in range(r):
        for j in range(m):
            grid[:, i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = tiles[i, j]
    return grid


def plot_synthetic_sets(
    sets: Mapping[str, SyntheticSet | str | Path],
    out_png: str | Path,
    *,
    ncols: int | None = None,
    dataset: Dataset | None = None,
    root: str | Path | None = None,
    title: str | None = None,
    max_classes: int = 20,
    max_per_class: int = 20,
) -> Figure:
    """Several saved sets side by side, one panel per set titled by its key (and its header's
    method, labels, IPC, iteration and lr), each drawn as :func:`plot_synthetic` draws it; at
    most ``ncols`` panels a row (default: all of them, up to 4)."""
    if not sets:
        raise ValueError("no synthetic sets to draw")
    mosaics = []
    for name, synthetic in sets.items():
        loaded, _ = _load_set(synthetic)
        mosaics.append(_set_mosaic(loaded, dataset=dataset, root=root,
                                   title=f"{name}\n{_describe(loaded)}",
                                   max_classes=max_classes, max_per_class=max_per_class))
    if any(m.captions is not None for m in mosaics):  # one scale for all panels
        mosaics = [dataclasses.replace(m, caption_room=True) for m in mosaics]
    fig = _mosaic_figure(mosaics, ncols or min(len(mosaics), 4), title)
    save_png(fig, out_png)
    return fig


def plot_experiment_sets(
    path: str | Path,
    out_png: str | Path,
    *,
    keys: Sequence[str] | None = None,
    attr: str = "synthetic_sets",
    **kwargs: Any,
) -> Figure:
    """The sets an experiment made, side by side: the results file ``path`` names them in its
    attribute ``attr`` (panel title -> synthetic.safetensors path); ``keys`` picks some, in
    order. Other keyword arguments go to :func:`plot_synthetic_sets`."""
    ds = load_results(path)
    recorded = ds.attrs.get(attr)
    if not isinstance(recorded, dict) or not recorded:
        raise KeyError(f"{path} has no attribute {attr!r} naming the synthetic sets it made")
    keys = list(recorded) if keys is None else list(keys)
    missing = [k for k in keys if k not in recorded]
    if missing:
        raise KeyError(f"{path} records no sets {missing}; it has {list(recorded)}")
    title = kwargs.pop("title", None) or f"Synthetic sets of {Path(path).stem}"
    return plot_synthetic_sets({k: recorded[k] for k in keys}, out_png, title=title, **kwargs)


def plot_image_strip(
    snapshots: str | Path | Sequence[str | Path],
    out_png: str | Path,
    *,
    images: Sequence[int] | None = None,
    iterations: Sequence[int] | None = None,
    dataset: Dataset | None = None,
    root: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """The same images of one set at several iterations: one row per snapshot, one column per
    image.

    snapshots: a run folder (its ``snapshots/images_*.safetensors``, which a run with
    ``DistillConfig.snapshot_every > 0`` keeps) or a list of synthetic-set files of one run.
    images: indices into the set (default: the first image of each class, up to 10);
    iterations: the snapshots to show, by iteration (default: up to 6, evenly spaced, the first
    and the last included). Pixels as in :func:`plot_synthetic`; soft labels' top class and
    probability under each image.
    """
    if isinstance(snapshots, (str, Path)):
        files = snapshot_paths(snapshots)
        if not files:
            raise FileNotFoundError(
                f"no snapshots in {Path(snapshots) / SNAPSHOTS}: distil with snapshot_every > 0"
            )
    else:
        files = [Path(f) for f in snapshots]
    sets = sorted(((load_synthetic(f), f) for f in files),
                  key=lambda pair: int(pair[0].header.get("iteration", -1)))
    by_iteration = {int(s.header.get("iteration", -1)): (s, f) for s, f in sets}
    available = sorted(by_iteration)
    if iterations is None:
        picks = np.unique(np.linspace(0, len(available) - 1, min(6, len(available))).round())
        iterations = [available[int(i)] for i in picks]
    missing = [i for i in iterations if i not in by_iteration]
    if missing:
        raise ValueError(f"no snapshot at iterations {missing}; there are {available}")
    first, where = by_iteration[iterations[0]]
    k, ipc, names = class_layout(first, str(where))
    n = len(first.images)
    images = list(range(0, n, ipc))[:10] if images is None else list(images)
    bad = [i for i in images if not 0 <= i < n]
    if bad or not images:
        raise ValueError(f"image indices {bad or images} are not in the set's 0..{n - 1}")
    rows, captions, off = [], [], []
    for it in iterations:
        synthetic, where = by_iteration[it]
        if len(synthetic.images) != n:
            raise ValueError(f"{where} holds {len(synthetic.images)} images, {n} expected: "
                             "snapshots of another run?")
        pixels, note = _pixels_of(synthetic, dataset, root)
        rows.append(pixels[images])
        top = _top_classes(synthetic)
        captions.append([None if top is None else _caption(names, top[0][i], top[1][i])
                         for i in images])
        off.append([top is not None and top[0][i] != i // ipc for i in images])
    has_captions = any(c is not None for col in captions for c in col)
    mosaic = _Mosaic(
        tiles=np.stack(rows),  # (R iterations, M images, C, H, W)
        row_labels=[f"iteration {it}" for it in iterations],
        # "#j": the j-th image of its class, where not every image shown is a class's first
        col_labels=[_short(names[i // ipc]) + (f" #{i % ipc}" if any(j % ipc for j in images)
                                               else "") for i in images],
        captions=captions if has_captions else None,
        off_class=np.asarray(off) if has_captions else None,
        title=(title if title is not None else f"{_describe(first).rsplit(', iteration', 1)[0]}"
               ": the same images over the iterations") + (f"\n{note}" if note else ""),
    )
    fig = _mosaic_figure([mosaic], 1, None)
    save_png(fig, out_png)
    return fig

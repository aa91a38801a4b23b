"""Figures drawn from saved results only.

Every ``plot_*`` function takes the path of a netCDF file written by
:func:`tesla_func.results.save_results`, draws with seaborn on a fresh
:class:`matplotlib.figure.Figure` (no pyplot state, no global backend or style change), writes the
PNG atomically and returns the figure. Dims not named as x, hue or style are *replicates*
(``model``, ``seed``, ``repeat``, ...): lines show their mean and a +- 1 std band, bars their mean
+- std (population std, as the accuracy tables report it).

Pictures of synthetic sets (``plot_synthetic``, ``plot_synthetic_sets``, ``plot_experiment_sets``,
``plot_image_strip``) are drawn from saved synthetic-set files in the same way: the images turned
back into pixels from the file's own ``dataset_info``.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
import torch
import xarray as xr
from matplotlib.figure import Figure
from torch import Tensor

from tesla_func.data import Dataset, pixels_from_info
from tesla_func.fileio import atomic_path
from tesla_func.results import load_results
from tesla_func.synthetic import SNAPSHOTS, SyntheticSet, load_synthetic, snapshot_paths

_STYLE = "whitegrid"
_DPI = 120
_MIB = 2**20


def save_png(fig: Figure, out_png: str | Path) -> Path:
    """Write ``fig`` as PNG through a temporary file renamed into place."""
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    return out_png


def _variable(ds: xr.Dataset, name: str, path: str | Path) -> xr.DataArray:
    if name not in ds.data_vars:
        raise KeyError(f"{path} has no variable {name!r}; it has {sorted(ds.data_vars)}")
    return ds[name]


def _frame(da: xr.DataArray, keep: Sequence[str]) -> pd.DataFrame:
    """Long table of ``da`` (one row per element, NaN dropped) with a ``series`` column naming
    the combination of the ``keep`` dims ('tesla' or 'method=tesla, labels=soft')."""
    missing = [k for k in keep if k not in da.dims]
    if missing:
        raise KeyError(f"{da.name} has no dims {missing}; its dims are {da.dims}")
    frame = da.to_dataframe(name=da.name).reset_index().dropna(subset=[da.name])
    if not keep:
        frame["series"] = str(da.name)
    elif len(keep) == 1:
        frame["series"] = frame[keep[0]].astype(str)
    else:
        frame["series"] = (
            frame[list(keep)]
            .astype(str)
            .apply(lambda row: ", ".join(f"{k}={v}" for k, v in row.items()), axis=1)
        )
    return frame


def _label(da: xr.DataArray, scale: float) -> str:
    units = da.attrs.get("units")
    if scale == 100 and units == "fraction":
        return f"{da.name} (%)"
    return f"{da.name} ({units})" if units else str(da.name)


def _percent(da: xr.DataArray) -> float:
    """Fractions are shown as percentages."""
    return 100.0 if da.attrs.get("units") == "fraction" else 1.0


def _hue_dims(
    da: xr.DataArray, x: str | None, hue: Sequence[str] | None, replicate: Sequence[str]
) -> list[str]:
    if hue is not None:
        return list(hue)
    return [d for d in da.dims if d != x and d not in replicate]


def plot_accuracy_vs_iteration(
    path: str | Path,
    out_png: str | Path,
    *,
    var: str = "accuracy",
    x: str = "iteration",
    hue: Sequence[str] | None = None,
    replicate: Sequence[str] = ("model", "seed"),
    best_so_far: bool = True,
    title: str | None = None,
) -> Figure:
    """Test accuracy against distillation iteration, one line per hue combination.

    ``hue`` defaults to every dim of ``var`` except ``x`` and the ``replicate`` dims (e.g.
    method and label strategy). Solid: mean +- std over replicates; dashed: the best mean so far
    (what a run that keeps its best synthetic set reports).
    """
    ds = load_results(path)
    da = _variable(ds, var, path)
    if x not in da.dims:
        raise KeyError(f"{var} in {path} has no dim {x!r}; its dims are {da.dims}")
    scale = _percent(da)
    frame = _frame(da * scale if scale != 1 else da, _hue_dims(da, x, hue, replicate))
    series = list(dict.fromkeys(frame["series"]))
    palette = dict(zip(series, sns.color_palette(n_colors=len(series))))
    has_reps = any(d in da.dims for d in replicate)
    with sns.axes_style(_STYLE):
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.subplots()
        sns.lineplot(
            data=frame,
            x=x,
            y=var,
            hue="series",
            palette=palette,
            marker="o",
            errorbar="sd" if has_reps else None,
            ax=ax,
        )
        if best_so_far:
            means = frame.groupby(["series", x])[var].mean().reset_index().sort_values(x)
            for name, group in means.groupby("series", sort=False):
                ax.plot(
                    group[x], group[var].cummax(), linestyle="--", color=palette[name], alpha=0.8
                )
        ax.set_xlabel(x)
        ax.set_ylabel(_label(da, scale) + (" (dashed: best so far)" if best_so_far else ""))
        ax.legend(title=", ".join(_hue_dims(da, x, hue, replicate)) or None)
        ax.set_title(title or f"{var} vs {x}")
    save_png(fig, out_png)
    return fig


def plot_scaling(
    path: str | Path,
    out_png: str | Path,
    *,
    x: str = "steps",
    hue: str = "method",
    time_var: str = "time_s",
    memory_vars: Sequence[str] = ("peak_bytes", "rss_bytes"),
    log_y: bool = False,
    title: str | None = None,
) -> Figure:
    """Memory (MiB) and wall time against the number of unrolled steps T, one line per method.

    Reads the benchmark file (dims (method, steps, [repeat...]); variables ``time_s``,
    ``peak_bytes``, ``rss_bytes`` by default). Memory variables absent from the file are skipped;
    line style tells the memory variables apart.
    """
    ds = load_results(path)
    mems = [m for m in memory_vars if m in ds.data_vars]
    panels = (["memory"] if mems else []) + (["time"] if time_var in ds.data_vars else [])
    if not panels:
        raise KeyError(
            f"{path} has none of {[*memory_vars, time_var]}; it has {sorted(ds.data_vars)}"
        )
    with sns.axes_style(_STYLE):
        fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(panels)))
        for ax, panel in zip(axes, panels):
            if panel == "memory":
                frame = pd.concat(
                    [
                        _frame(ds[m] / _MIB, [hue]).rename(columns={m: "MiB"}).assign(variable=m)
                        for m in mems
                    ]
                )
                sns.lineplot(
                    data=frame,
                    x=x,
                    y="MiB",
                    hue=hue,
                    style="variable",
                    marker="o",
                    errorbar="sd",
                    ax=ax,
                )
                ax.set_ylabel("memory (MiB)")
                ax.set_title("memory")
            else:
                frame = _frame(_variable(ds, time_var, path), [hue])
                sns.lineplot(data=frame, x=x, y=time_var, hue=hue, marker="o", errorbar="sd", ax=ax)
                ax.set_ylabel(
                    _label(ds[time_var], 1.0) if "units" in ds[time_var].attrs else "time (s)"
                )
                ax.set_title("time")
            ax.set_xlabel(x)
            if log_y:
                ax.set_yscale("log")
        if title:
            fig.suptitle(title)
    save_png(fig, out_png)
    return fig


def plot_bar(
    path: str | Path,
    out_png: str | Path,
    *,
    var: str = "accuracy",
    x: str | None = "ipc",
    hue: str | None = "method",
    replicate: Sequence[str] = ("model", "seed"),
    title: str | None = None,
) -> Figure:
    """Grouped bars of mean +- std of ``var`` (an accuracy table): groups along ``x``, one bar
    colour per ``hue`` value, each bar annotated 'mean +- std'. ``x`` / ``hue`` may be None or a
    dim the file lacks (one group / one colour); dims left over must be replicate dims."""
    ds = load_results(path)
    da = _variable(ds, var, path)
    scale = _percent(da)
    x = x if x in da.dims else None
    hue = hue if hue in da.dims else None
    extra = [d for d in da.dims if d not in (x, hue) and d not in replicate]
    if extra:
        raise ValueError(
            f"{var} in {path} has dims {extra} that are neither x, hue nor replicates "
            f"{list(replicate)}: select or average them first"
        )
    frame = (da * scale).to_dataframe(name=var).reset_index().dropna(subset=[var])
    frame["_x"] = frame[x].astype(str) if x else ""
    frame["_hue"] = frame[hue].astype(str) if hue else var
    table = frame.groupby(["_x", "_hue"], sort=False)[var].agg(
        mean="mean", std=lambda v: v.std(ddof=0)
    )
    groups, colours = list(dict.fromkeys(frame["_x"])), list(dict.fromkeys(frame["_hue"]))
    palette = sns.color_palette(n_colors=len(colours))
    width = 0.8 / len(colours)
    with sns.axes_style(_STYLE):
        fig = Figure(
            figsize=(max(4.0, 1.2 * len(groups) * len(colours) + 1.5), 4.5), layout="constrained"
        )
        ax = fig.subplots()
        for j, name in enumerate(colours):
            rows = [table.loc[(g, name)] if (g, name) in table.index else None for g in groups]
            pos = np.arange(len(groups)) + (j - (len(colours) - 1) / 2) * width
            means = [r["mean"] if r is not None else np.nan for r in rows]
            stds = [r["std"] if r is not None else np.nan for r in rows]
            ax.bar(pos, means, width * 0.95, yerr=stds, capsize=3, color=palette[j], label=name)
            for p, m, s in zip(pos, means, stds):
                if not math.isnan(m):
                    ax.annotate(
                        f"{m:.1f}±{s:.1f}",
                        (p, m),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        xytext=(0, 2),
                        textcoords="offset points",
                    )
        ax.set_xticks(np.arange(len(groups)), groups)
        ax.set_xlabel(x or "")
        ax.set_ylabel(_label(da, scale))
        if hue:
            ax.legend(title=hue)
        ax.set_title(title or f"{var}: mean ± std")
    save_png(fig, out_png)
    return fig


def grid_images(
    images: Any,
    labels_or_names: Sequence[Any] | Any,
    out_png: str | Path,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    ncols: int | None = None,
    title: str | None = None,
) -> Figure:
    """A grid of images (e.g. a synthetic set) titled by label, written as PNG.

    images: (N, C, H, W) tensor or array with C = 1 (grey) or 3 (RGB), normalised;
    labels_or_names: N titles (class indices or names);
    mean, std: the per-channel normalisation to undo (``x * std + mean``, then clipped to [0, 1]);
    without them each image is min-max scaled to [0, 1] (suits ZCA-whitened sets).
    """
    arr = np.asarray(
        images.detach().cpu() if hasattr(images, "detach") else images, dtype=np.float64
    )
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or arr.shape[0] == 0:
        raise ValueError(
            f"images must be (N, C, H, W) with N >= 1 and C in (1, 3), got {arr.shape}"
        )
    names = [
        str(v)
        for v in np.asarray(
            labels_or_names.detach().cpu()
            if hasattr(labels_or_names, "detach")
            else labels_or_names
        ).tolist()
    ]
    if len(names) != arr.shape[0]:
        raise ValueError(f"got {len(names)} labels for {arr.shape[0]} images")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        arr = arr * np.asarray(std).reshape(1, -1, 1, 1) + np.asarray(mean).reshape(1, -1, 1, 1)
        arr = arr.clip(0.0, 1.0)
    else:
        lo = arr.min(axis=(1, 2, 3), keepdims=True)
        hi = arr.max(axis=(1, 2, 3), keepdims=True)
        arr = (arr - lo) / np.where(hi > lo, hi - lo, 1.0)
    n = arr.shape[0]
    ncols = ncols or min(n, 10)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(1.2 * ncols, 1.35 * nrows + (0.4 if title else 0)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < n:
            img = arr[i].transpose(1, 2, 0)  # (H, W, C)
            ax.imshow(
                img[..., 0] if img.shape[2] == 1 else img,
                cmap="gray",
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_title(names[i], fontsize=8)
    if title:
        fig.suptitle(title)
    save_png(fig, out_png)
    return fig


def plot_sweeps(
    path: str | Path,
    out_png: str | Path,
    *,
    variables: Sequence[str],
    sweeps: Sequence[str],
    base: str = "base_point",
    replicate: Sequence[str] = ("segment", "seed"),
    log_x: Sequence[str] = ("lr",),
    title: str | None = None,
) -> Figure:
    """One-factor-at-a-time sweeps: each variable against each swept dim, the others held fixed.

    The file stores the sweeps on the full grid of the swept dims, unmeasured combinations NaN
    (:func:`tesla_func.results.records_to_results` writes them so); ``ds.attrs[base]`` maps each
    swept dim to its base value. Panel (row = variable, column = swept dim ``d``) shows the
    variable against ``d`` with every other swept dim selected at its base value: mean +- 1 std
    over the ``replicate`` dims, one line per combination of any remaining dims. Dims in
    ``log_x`` get a logarithmic axis.
    """
    ds = load_results(path)
    point = ds.attrs.get(base)
    if not isinstance(point, dict) or any(d not in point for d in sweeps):
        raise KeyError(
            f"{path} needs an attribute {base!r} mapping each of {list(sweeps)} to its "
            f"base value; it has {point!r}"
        )
    das = [_variable(ds, v, path) for v in variables]
    with sns.axes_style(_STYLE):
        fig = Figure(figsize=(4.2 * len(sweeps), 3.2 * len(das)), layout="constrained")
        axes = np.atleast_2d(fig.subplots(len(das), len(sweeps), squeeze=False))
        for row, da in zip(axes, das):
            for ax, dim in zip(row, sweeps):
                line = da.sel({d: point[d] for d in sweeps if d != dim})
                keep = [d for d in line.dims if d != dim and d not in replicate]
                frame = _frame(line, keep)
                sns.lineplot(
                    data=frame,
                    x=dim,
                    y=da.name,
                    hue="series" if keep else None,
                    marker="o",
                    errorbar="sd",
                    ax=ax,
                    legend=bool(keep),
                )
                if dim in log_x:
                    ax.set_xscale("log")
                held = ", ".join(f"{d}={point[d]:g}" for d in sweeps if d != dim)
                ax.set_title(f"vs {dim} ({held})", fontsize=9)
                ax.set_ylabel(_label(da, 1.0))
        if title:
            fig.suptitle(title)
    save_png(fig, out_png)
    return fig


# ----------------------------------------------------------------------------------------------
# Pictures of synthetic sets, drawn from their saved files (synthetic.safetensors, snapshots)
#
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


def _classes_of(synthetic: SyntheticSet, where: str) -> tuple[int, int, list[str]]:
    """(K, ipc, class names) of a saved set: its images are class-major, ipc of each class."""
    info = synthetic.header.get("dataset_info")
    if not isinstance(info, dict) or "num_classes" not in info:
        raise ValueError(f"{where} has no dataset_info in its header: cannot tell its classes")
    k, n = int(info["num_classes"]), len(synthetic.images)
    if n == 0 or n % k:
        raise ValueError(f"{where} holds {n} images, not a multiple of its {k} classes")
    names = [str(c) for c in info.get("class_names") or range(k)]
    return k, n // k, names


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
    k, ipc, names = _classes_of(synthetic, where)
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
    k, ipc, names = _classes_of(first, str(where))
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


def plot_label_drift(
    path: str | Path,
    out_png: str | Path,
    *,
    x: str = "log_iteration",
    drift: str = "label_drift",
    counts: str = "class_count",
    hue: str = "label_strategy",
    focus: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Figure:
    """How labels drift away from the images' classes (from a results file).

    Left: ``drift`` (the fraction of images whose teacher label is not their starting class)
    against ``x``, one line per ``hue`` value, line style by any other dim (e.g. IPC). Middle:
    the largest and smallest ``counts`` (images per class by teacher label, dims (..., x,
    class)) against ``x`` at ``focus`` (default: the last value of every dim but ``hue``), one
    colour per ``hue`` value, the even count dotted. Right: the counts of every class against
    ``x`` at ``focus`` and its ``hue`` value (default "sla" where there is one), as a heatmap.
    """
    ds = load_results(path)
    da, count = _variable(ds, drift, path), _variable(ds, counts, path)
    for name, var in ((drift, da), (counts, count)):
        if x not in var.dims or hue not in var.dims:
            raise KeyError(f"{name} in {path} needs dims {x!r} and {hue!r}; it has {var.dims}")
    others = [d for d in da.dims if d not in (x, hue)]
    focus = dict(focus or {})
    for d in others:
        focus.setdefault(d, da[d].values[-1])
    hues = [str(v) for v in da[hue].values]
    focus.setdefault(hue, "sla" if "sla" in hues else hues[-1])
    palette = dict(zip(hues, sns.color_palette(n_colors=len(hues))))
    with sns.axes_style(_STYLE):
        fig = Figure(figsize=(16, 4.6), layout="constrained")
        left, middle, right = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.2]})
        frame = (da * 100).to_dataframe(name=drift).reset_index().dropna(subset=[drift])
        frame[hue] = frame[hue].astype(str)
        style = others[0] if others else None
        if style is not None:
            frame[style] = frame[style].astype(str)
        sns.lineplot(data=frame, x=x, y=drift, hue=hue, style=style, palette=palette, ax=left)
        left.set_ylabel("teacher label is another class (%)")
        left.set_xlabel("iteration")
        left.set_title("label drift")
        at = count.sel({d: v for d, v in focus.items() if d != hue and d in count.dims})
        for name in hues:
            line = at.sel({hue: name})
            xs = line[x].values
            left_out = line.isnull().all("class").values
            hi, lo = line.max("class").values, line.min("class").values
            middle.plot(xs[~left_out], hi[~left_out], color=palette[name], label=f"{name} max")
            middle.plot(xs[~left_out], lo[~left_out], color=palette[name], linestyle="--",
                        label=f"{name} min")
        even = float(at.isel({hue: 0}).dropna(x).isel({x: 0}).sum("class")) / at.sizes["class"]
        middle.axhline(even, color="grey", linestyle=":", label="even")
        middle.set_xlabel("iteration")
        middle.set_ylabel("images per class (by teacher label)")
        where = ", ".join(f"{d} {focus[d]}" for d in others)
        middle.set_title(f"largest / smallest class ({where})" if where else
                         "largest / smallest class")
        middle.legend(fontsize=7, ncols=2)
        grid = at.sel({hue: focus[hue]}).transpose("class", x)
        image = right.imshow(grid.values, aspect="auto", interpolation="nearest", cmap="viridis",
                             extent=(float(grid[x].values[0]) - 0.5,
                                     float(grid[x].values[-1]) + 0.5, grid.sizes["class"] - 0.5,
                                     -0.5))
        names = (grid["class_name"].values if "class_name" in grid.coords
                 else grid["class"].values)
        right.set_yticks(np.arange(grid.sizes["class"]), [str(v) for v in names], fontsize=7)
        right.grid(False)
        right.set_xlabel("iteration")
        right.set_title(f"images per class, {hue} {focus[hue]}"
                        + (f", {where}" if where else ""))
        fig.colorbar(image, ax=right, label="images")
        fig.suptitle(title or "How far labels drift from the classes the images started in")
    save_png(fig, out_png)
    return fig


def plot_memory_plan(
    path: str | Path,
    out_png: str | Path,
    *,
    steps_vars: Sequence[str] = ("steps_total_bytes",),
    dataset_var: str = "dataset_total_bytes",
    reference_vars: Sequence[str] = ("steps_public_tesla_bytes",),
    dataset_reference_var: str | None = "dataset_public_tesla_bytes",
    device_attr: str = "device_bytes",
    title: str | None = None,
) -> Figure:
    """Predicted memory (GiB, log scale): against T, one line per method (black dashed: the
    ``reference_vars`` over steps, e.g. a lower bound of another implementation), and by dataset
    at one T, one bar per method (black marks: ``dataset_reference_var`` over dataset); a dotted
    line at the device memory ``ds.attrs[device_attr]`` if set.

    Reads a file with ``steps_vars`` over (method, steps) and ``dataset_var`` over (dataset,
    method); any further dim of the dataset panel's variables is shown at its last value (e.g.
    the largest T). Panels whose variables are missing are left out.
    """
    ds = load_results(path)
    left = [v for v in steps_vars if v in ds.data_vars]
    refs = [v for v in reference_vars if v in ds.data_vars]
    panels = (["steps"] if left else []) + (["dataset"] if dataset_var in ds.data_vars else [])
    if not panels:
        raise KeyError(f"{path} has none of {[*steps_vars, dataset_var]}; it has "
                       f"{sorted(ds.data_vars)}")
    device = ds.attrs.get(device_attr)
    gib = 2**30
    with sns.axes_style(_STYLE):
        fig = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(panels)))
        for ax, panel in zip(axes, panels):
            if panel == "steps":
                for var in left:
                    frame = _frame(ds[var] / gib, ["method"])
                    sns.lineplot(data=frame, x="steps", y=var, hue="series", marker="o", ax=ax)
                for var in refs:
                    ax.plot(ds["steps"].values, ds[var].values / gib, "k--", marker=".",
                            label=ds[var].attrs.get("long_name", var))
                ax.set_xlabel("T, student steps")
                ax.set_title(ds.attrs.get("steps_title", "against T"), fontsize=10)
            else:
                def last(da: xr.DataArray) -> xr.DataArray:
                    return da.isel({d: -1 for d in da.dims if d not in ("dataset", "method")})

                frame = (last(ds[dataset_var]) / gib).to_dataframe(name="GiB").reset_index()
                sns.barplot(data=frame, x="dataset", y="GiB", hue="method", ax=ax)
                if dataset_reference_var in ds.data_vars:
                    ref = last(ds[dataset_reference_var])
                    ax.scatter(np.arange(ref.sizes["dataset"]), ref.values / gib, marker="_",
                               s=900, color="black", zorder=3,
                               label=ref.attrs.get("long_name", dataset_reference_var))
                ax.set_title(ds.attrs.get("dataset_title", "by dataset"), fontsize=10)
            if device is not None and device > 0:
                ax.axhline(device / gib, color="grey", linestyle=":",
                           label=f"device {device / gib:.0f} GiB")
            ax.set_yscale("log")
            ax.set_ylabel("predicted peak (GiB)")
            ax.legend(fontsize=8)
        if title:
            fig.suptitle(title)
    save_png(fig, out_png)
    return fig


def plot_distributed(
    path: str | Path,
    out_png: str | Path,
    *,
    x: str = "world_size",
    hue: str = "microbatch",
    title: str | None = None,
) -> Figure:
    """Distillation on several ranks: memory per rank and time per iteration against the world
    size, one bar per microbatch size.

    Reads a file with dims (world_size, microbatch, rank) and variables ``held_bytes`` and
    ``peak_bytes`` (memory: their sum, the largest over the ranks, with the held part hatched)
    and ``time_s`` (the slowest rank's), as experiments/bench_distributed.py writes it.
    """
    ds = load_results(path)
    for name in ("held_bytes", "peak_bytes", "time_s"):
        _variable(ds, name, path)
    memory = (ds["held_bytes"] + ds["peak_bytes"]).max("rank") / _MIB
    held = ds["held_bytes"].max("rank") / _MIB
    time_s = ds["time_s"].max("rank")
    xs, hues = ds[x].values.tolist(), ds[hue].values.tolist()
    names = [str(h) if h else "none" for h in hues]
    palette = sns.color_palette(n_colors=len(hues))
    width = 0.8 / len(hues)
    with sns.axes_style(_STYLE):
        fig = Figure(figsize=(10, 4.2), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, (da, label) in zip(axes, ((memory, "memory per rank (MiB)"),
                                          (time_s, "time per iteration (s)"))):
            for j, h in enumerate(hues):
                pos = np.arange(len(xs)) + (j - (len(hues) - 1) / 2) * width
                values = [float(da.sel({x: v, hue: h})) for v in xs]
                ax.bar(pos, values, width * 0.95, color=palette[j], label=names[j])
                if da is memory:
                    ax.bar(pos, [float(held.sel({x: v, hue: h})) for v in xs], width * 0.95,
                           color="none", edgecolor="black", hatch="//", linewidth=0)
            ax.set_xticks(np.arange(len(xs)), [str(v) for v in xs])
            ax.set_xlabel(x.replace("_", " "))
            ax.set_ylabel(label)
            ax.legend(title=hue)
        axes[0].set_title("largest rank: held (hatched) + peak of an iteration")
        axes[1].set_title("slowest rank")
        if title:
            fig.suptitle(title)
    save_png(fig, out_png)
    return fig

"""Figures drawn from saved results only.

Every ``plot_*`` function takes the path of a netCDF file written by
:func:`tesla_func.results.save_results`, draws with seaborn on a fresh
:class:`matplotlib.figure.Figure` (no pyplot state, no global backend or style change), writes the
PNG atomically and returns the figure. Dims not named as x, hue or style are *replicates*
(``model``, ``seed``, ``repeat``, ...): lines show their mean and a +- 1 std band, bars their mean
+- std (population std, as the accuracy tables report it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure

from tesla_func.fileio import atomic_path
from tesla_func.results import load_results

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

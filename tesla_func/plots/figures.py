"""Figures drawn from saved results files (:func:`tesla_func.results.save_results`): accuracy
against iteration, memory and time against T, bars, and one-factor-at-a-time sweeps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from tesla_func.plots.style import (
    MIB,
    STYLE,
    axis_label,
    hue_dims,
    long_frame,
    percent_scale,
    save_png,
    variable,
)
from tesla_func.results import load_results


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
    da = variable(ds, var, path)
    if x not in da.dims:
        raise KeyError(f"{var} in {path} has no dim {x!r}; its dims are {da.dims}")
    scale = percent_scale(da)
    frame = long_frame(da * scale if scale != 1 else da, hue_dims(da, x, hue, replicate))
    series = list(dict.fromkeys(frame["series"]))
    palette = dict(zip(series, sns.color_palette(n_colors=len(series))))
    has_reps = any(d in da.dims for d in replicate)
    with sns.axes_style(STYLE):
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
        ax.set_ylabel(axis_label(da, scale) + (" (dashed: best so far)" if best_so_far else ""))
        ax.legend(title=", ".join(hue_dims(da, x, hue, replicate)) or None)
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
    with sns.axes_style(STYLE):
        fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(panels)))
        for ax, panel in zip(axes, panels):
            if panel == "memory":
                frame = pd.concat(
                    [
                        long_frame(ds[m] / MIB, [hue]).rename(columns={m: "MiB"}).assign(variable=m)
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
                frame = long_frame(variable(ds, time_var, path), [hue])
                sns.lineplot(data=frame, x=x, y=time_var, hue=hue, marker="o", errorbar="sd", ax=ax)
                ax.set_ylabel(
                    axis_label(ds[time_var], 1.0) if "units" in ds[time_var].attrs else "time (s)"
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
    ddof: int = 0,
    title: str | None = None,
) -> Figure:
    """Grouped bars of mean +- std of ``var`` (an accuracy table): groups along ``x``, one bar
    colour per ``hue`` value, each bar annotated 'mean +- std' (std over the replicates with
    ``ddof``: 1 for the sample std of a few seeds, as :func:`tesla_func.results.mean_std`).
    ``x`` / ``hue`` may be None or a dim the file lacks (one group / one colour); dims left over
    must be replicate dims."""
    ds = load_results(path)
    da = variable(ds, var, path)
    scale = percent_scale(da)
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
        mean="mean", std=lambda v: v.std(ddof=ddof) if len(v) > ddof else 0.0
    )
    groups, colours = list(dict.fromkeys(frame["_x"])), list(dict.fromkeys(frame["_hue"]))
    palette = sns.color_palette(n_colors=len(colours))
    width = 0.8 / len(colours)
    with sns.axes_style(STYLE):
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
        ax.set_ylabel(axis_label(da, scale))
        if hue:
            ax.legend(title=hue)
        ax.set_title(title or f"{var}: mean ± std")
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
    das = [variable(ds, v, path) for v in variables]
    with sns.axes_style(STYLE):
        fig = Figure(figsize=(4.2 * len(sweeps), 3.2 * len(das)), layout="constrained")
        axes = np.atleast_2d(fig.subplots(len(das), len(sweeps), squeeze=False))
        for row, da in zip(axes, das):
            for ax, dim in zip(row, sweeps):
                line = da.sel({d: point[d] for d in sweeps if d != dim})
                keep = [d for d in line.dims if d != dim and d not in replicate]
                frame = long_frame(line, keep)
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
                ax.set_ylabel(axis_label(da, 1.0))
        if title:
            fig.suptitle(title)
    save_png(fig, out_png)
    return fig

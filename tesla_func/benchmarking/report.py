"""The scaling benchmarks' results: the points of a session (:class:`ScalingRun`), the Dataset
(:func:`scaling_results`), its Markdown tables and the three files
(:func:`write_scaling_report`)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from tesla_func.benchmarking.config import (
    KEEP_DIM,
    MEMORY_GROWTH_TARGET,
    MIB,
    PEAK_RATIO_TARGET,
    REFERENCE,
    TIME_TARGETS,
    ScalingConfig,
)
from tesla_func.matching import METHODS
from tesla_func.plots import plot_scaling
from tesla_func.results import markdown_table, records_to_results, write_outputs


@dataclass
class ScalingRun:
    """The points of one benchmark session, collected as its tests run (one record per point).

    ``dim`` is what the session sweeps: ``"steps"`` (T, every method) or ``"keep_graphs"`` (k at
    T = ``config.keep_steps``; the reference ``unrolled`` ignores k: its one record has k None).
    """

    config: ScalingConfig
    full: bool  # the sizes (pytest --benchmark-only), else a smoke run at tiny sizes
    dim: str = "steps"
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.time)
    load_at_start: tuple[float, ...] = dataclasses.field(default_factory=lambda: _load_average())
    report: dict[str, Path] | None = None  # what write_scaling_report wrote, once it has

    def add(self, record: Mapping[str, Any]) -> None:
        key = (record["method"], record[self.dim])
        self.records = [r for r in self.records if (r["method"], r[self.dim]) != key]
        self.records.append(dict(record))

    def add_round(self, method: str, value: int | None, wall: float, cpu: float) -> None:
        """A further timed round of a recorded point: keep the fastest wall and CPU times."""
        record = self.get(method, value)
        record["time_s"], record["cpu_s"] = min(record["time_s"], wall), min(record["cpu_s"], cpu)

    def get(self, method: str, value: int | None) -> dict[str, Any] | None:
        """The record of ``method`` at ``value`` of the swept dim (T, or k)."""
        return next((r for r in self.records if (r["method"], r[self.dim]) == (method, value)),
                    None)

    def dataset(self) -> xr.Dataset:
        kinds = sorted({r["memory_kind"] for r in self.records})
        before = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)  # provenance's device name reads the count
        records = self.records
        if self.dim == KEEP_DIM:
            records = _at_every_keep(records, self.config.keep_graphs)
        try:
            return scaling_results(records, self.config, dim=self.dim,
                                   memory_kind=", ".join(kinds),
                                   full_sizes=self.full, session_wall_s=time.time() - self.started,
                                   load_average_start=list(self.load_at_start),
                                   load_average_end=list(_load_average()))
        finally:
            torch.set_num_threads(before)


def _at_every_keep(records: Sequence[Mapping[str, Any]],
                   keep: Sequence[int]) -> list[dict[str, Any]]:
    """The records, the reference's (keep_graphs None: it ignores k) repeated at every k."""
    out = [dict(r) for r in records if r[KEEP_DIM] is not None]
    for r in records:
        if r[KEEP_DIM] is None:
            out += [{**r, KEEP_DIM: k} for k in keep]
    return out


def _load_average() -> tuple[float, ...]:
    """1, 5 and 15 minute load averages (how busy the shared machine was), or () if unknown."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return ()


VARIABLE_ATTRS = {
    "time_s": {"units": "s", "long_name": "wall time of one call (fastest round)"},
    "cpu_s": {"units": "s", "long_name": "CPU time of this process in one call (fastest round; "
                                         "all threads; less sensitive to other jobs than wall)"},
    "peak_bytes": {"units": "bytes", "long_name": "peak memory the call adds (see memory_kind)"},
    "rss_bytes": {"units": "bytes", "long_name": "process peak RSS above the RSS before the call "
                                                 "(fresh subprocess; NaN where not measured)"},
    "rss_peak_bytes": {"units": "bytes", "long_name": "process peak RSS of the fresh subprocess"},
    "loss": {"units": "1", "long_name": "normalised trajectory loss L (a sanity check)"},
    "flops": {"units": "FLOP", "long_name": "floating-point operations of the call, predicted "
                                            "(tesla_func.memory.predict_cost: matmuls and "
                                            "convolutions)"},
}
OPTIONAL_VARIABLES = ("flops",)  # kept only where some record has them


def scaling_results(records: Sequence[Mapping[str, Any]], config: ScalingConfig | Mapping,
                    device: str | None = None, *, dim: str = "steps", **attrs: Any) -> xr.Dataset:
    """Records ``{method, <dim>, time_s, peak_bytes, [rss_bytes, flops, ...], loss}`` -> a
    Dataset with dims (method, dim), the config and provenance (torch version, git revision,
    device) as attributes; a :class:`ScalingConfig` also adds its sizes, threads and rounds (and
    for ``dim`` "keep_graphs" the T it ran at, ``steps``). ``attrs`` adds more (memory_kind, load
    averages, ...)."""
    names = [k for k in VARIABLE_ATTRS
             if k not in OPTIONAL_VARIABLES or any(k in r for r in records)]
    rows = [{k: r.get(k, math.nan) for k in ["method", dim, *names]} for r in records]
    is_cfg = isinstance(config, ScalingConfig)
    ds = records_to_results(rows, ["method", dim], config=config,
                            seed=config.seed if is_cfg else None,
                            device=config.device if is_cfg else device, **attrs)
    order = [m for m in METHODS if m in ds["method"].values]  # registry order: unrolled first
    ds = ds.sel({"method": order})  # (sel's own `method=` is a fill method)
    for name in names:
        ds[name] = ds[name].astype(np.float64)
        ds[name].attrs.update(VARIABLE_ATTRS[name])
    ds[dim].attrs.update(long_name="T, student steps" if dim == "steps" else
                         "k = keep_graphs, final steps whose first-pass graphs are kept")
    if is_cfg:
        ds.attrs.update(width=config.width, depth=config.depth, num_images=config.num_images,
                        image_size=config.image_size, channels=config.channels,
                        num_classes=config.num_classes, threads=config.threads,
                        rounds=config.rounds)
        if dim == KEEP_DIM:
            ds.attrs["steps"] = config.keep_steps
    return ds


def scaling_table(ds: xr.Dataset) -> str:
    """Markdown: per T and method, time and peak memory and their ratios to ``unrolled``, then the
    issue's targets checked at the largest and smallest T."""

    def ratio(var: str, method: str, steps: int) -> float:
        if REFERENCE not in ds["method"].values:
            return math.nan
        at = ds[var].sel(steps=steps)
        return float(at.sel({"method": method}) / at.sel({"method": REFERENCE}))

    rows = []
    for steps in ds["steps"].values.tolist():
        for method in ds["method"].values.tolist():
            at = ds.sel({"method": method, "steps": steps})
            rows.append([steps, method, float(at["time_s"]), ratio("time_s", method, steps),
                         ratio("cpu_s", method, steps), float(at["peak_bytes"]) / MIB,
                         ratio("peak_bytes", method, steps), float(at["rss_bytes"]) / MIB])
    table = markdown_table(["T", "method", "time (s)", "time / unrolled", "CPU time / unrolled",
                            "peak (MiB)", "peak / unrolled", "RSS added (MiB)"], rows)
    lo, hi = int(ds["steps"].min()), int(ds["steps"].max())
    methods = ds["method"].values.tolist()
    steps = ds["steps"].values.tolist()

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    def listed(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    growth = []
    for m in methods:
        peak = ds["peak_bytes"].sel({"method": m})
        g = float(peak.sel(steps=hi) / peak.sel(steps=lo))
        aim = (f"{verdict(g <= MEMORY_GROWTH_TARGET)}: <= {MEMORY_GROWTH_TARGET}"
               if m in TIME_TARGETS else f"linear: {hi / lo:.2f}")
        growth.append(f"`{m}` {g:.3f} ({aim})")
    lines = [f"Targets (issue 5) at T = {steps}:",
             f"- peak at T={hi} / peak at T={lo}: " + "; ".join(growth)]
    for m in methods:
        if m not in TIME_TARGETS or REFERENCE not in methods:
            continue
        fold = 1 / ratio("peak_bytes", m, hi)
        walls = [ratio("time_s", m, t) for t in steps]
        cpus = [ratio("cpu_s", m, t) for t in steps]
        limit = TIME_TARGETS[m]
        lines.append(
            f"- `{m}`: `{REFERENCE}` peak / `{m}` peak at T={hi} = {fold:.1f}x "
            f"({verdict(fold >= PEAK_RATIO_TARGET)}: >= {PEAK_RATIO_TARGET:g}); time / "
            f"`{REFERENCE}` wall {listed(walls)} ({verdict(max(walls) <= limit)}: <= {limit}), "
            f"CPU {listed(cpus)} ({verdict(max(cpus) <= limit)})")
    kind = ds.attrs.get("memory_kind", "?")
    return (f"{table}\n\npeak = {kind} peak the call adds; time = wall time of one call, the "
            f"fastest of {ds.attrs.get('rounds', '?')} timed round(s) taken method by method after "
            f"an untimed warm-up (the memory run); CPU time = this process's CPU time in a call "
            f"(the fastest round); torch threads: "
            f"{ds.attrs.get('threads', '?')}.\n\n" + "\n".join(lines))


def keep_graphs_table(ds: xr.Dataset) -> str:
    """Markdown: per k and method, time, peak memory and FLOPs and their ratios to ``unrolled`` at
    the same T (one row: it ignores k), then what k buys: each method's peak from the smallest k to
    the largest (non-decreasing?) and its time and FLOPs there, and ``exact`` at k = T against
    ``unrolled``."""
    methods, keeps = ds["method"].values.tolist(), ds[KEEP_DIM].values.tolist()
    steps = ds.attrs.get("steps")
    flops = "flops" in ds.data_vars

    def value(var: str, method: str, keep: int) -> float:
        return float(ds[var].sel({"method": method, KEEP_DIM: keep}))

    def ratio(var: str, method: str, keep: int) -> float:
        if REFERENCE not in methods:
            return math.nan
        return value(var, method, keep) / value(var, REFERENCE, keep)

    points = ([("any", REFERENCE, keeps[0])] if REFERENCE in methods else []) + [
        (k, m, k) for k in keeps for m in methods if m != REFERENCE]
    rows = [[shown, m, value("time_s", m, k), ratio("time_s", m, k), ratio("cpu_s", m, k),
             value("peak_bytes", m, k) / MIB, ratio("peak_bytes", m, k)]
            + ([value("flops", m, k) / 1e9, ratio("flops", m, k)] if flops else [])
            for shown, m, k in points]
    table = markdown_table(["k", "method", "time (s)", "time / unrolled", "CPU time / unrolled",
                            "peak (MiB)", "peak / unrolled"]
                           + (["GFLOPs (predicted)", "FLOPs / unrolled"] if flops else []), rows)
    lo, hi = keeps[0], keeps[-1]
    lines = [f"What k buys at T = {steps} (k = {lo} to {hi}):"]
    for m in methods:
        if m == REFERENCE:
            continue
        peaks = [value("peak_bytes", m, k) for k in keeps]
        rising = peaks == sorted(peaks)
        cost = (f"time {value('time_s', m, hi) / value('time_s', m, lo):.2f}x"
                + (f", FLOPs {value('flops', m, hi) / value('flops', m, lo):.2f}x" if flops
                   else ""))
        lines.append(f"- `{m}`: peak {peaks[0] / MIB:.1f} -> {peaks[-1] / MIB:.1f} MiB "
                     f"(non-decreasing in k: {'yes' if rising else 'NO'}); {cost} those of "
                     f"k = {lo}")
    if "exact" in methods and REFERENCE in methods and steps in keeps:
        lines.append(
            f"- `exact` at k = T = {steps} against `{REFERENCE}`: peak "
            f"{ratio('peak_bytes', 'exact', steps):.3f}x, time {ratio('time_s', 'exact', steps):.2f}x"
            + (f", FLOPs {ratio('flops', 'exact', steps):.3f}x" if flops else ""))
    kind = ds.attrs.get("memory_kind", "?")
    return (f"{table}\n\nk = keep_graphs; `{REFERENCE}` ignores it (measured once, the same at "
            f"every k). peak = {kind} peak the call adds; time = wall time of one call, the "
            f"fastest of {ds.attrs.get('rounds', '?')} timed round(s) taken point by point (every "
            f"k and method in turn) after an untimed warm-up (the memory run); CPU time = this "
            f"process's CPU time in a call; FLOPs predicted (matmuls and convolutions); torch "
            f"threads: {ds.attrs.get('threads', '?')}.\n\n" + "\n".join(lines))


def write_scaling_report(ds: xr.Dataset, out_dir: str | Path, name: str) -> dict[str, Path]:
    """``<out_dir>/<name>.nc`` (with provenance), ``.png`` (memory and time against T, or against
    k for a keep_graphs benchmark; drawn from the saved file) and ``.md``
    (:func:`scaling_table` or :func:`keep_graphs_table`); returns their paths."""
    dim = KEEP_DIM if KEEP_DIM in ds.dims else "steps"
    sizes = ds.attrs.get("sizes") or (
        f"ConvNet depth {ds.attrs['depth']} width {ds.attrs['width']}, "
        f"{ds.attrs['num_images']} images {ds.attrs['channels']}x{ds.attrs['image_size']}x"
        f"{ds.attrs['image_size']}, torch threads: {ds.attrs['threads']}")
    if dim == KEEP_DIM:
        sizes = f"T = {ds.attrs.get('steps')}, {sizes}"
    table = keep_graphs_table(ds) if dim == KEEP_DIM else scaling_table(ds)
    return write_outputs(
        ds, name, Path(out_dir), table=table,
        plot=lambda nc, png: plot_scaling(nc, png, x=dim,
                                          title=f"{sizes} ({ds.attrs['device']})"),
        notes=f"Sizes: {sizes}. torch {ds.attrs.get('version_torch')}.",
    )

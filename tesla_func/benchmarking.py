"""Scaling benchmarks of the gradient methods: peak memory and wall time against T, and against
``keep_graphs`` k at one T.

The paper's headline is constant memory in T at a small runtime cost. ``keep_graphs = k`` buys
that cost back with memory (``tesla`` and ``exact`` keep the last k step graphs instead of
rebuilding them; at k = T ``exact`` does the work of ``unrolled``): :func:`keep_graphs_curves`
measures the trade, with ``unrolled`` at the same T as the reference. Two ways in:

- one call, for *your* model and settings: :func:`scaling_curves` takes ``make_args(T)``, a
  function returning the keyword arguments of :func:`~tesla_func.matching.match_trajectory` for a
  T-step problem (or a :class:`ScalingConfig` for the built-in ConvNet problem), measures every
  method at every T side by side, and returns the curves as an xarray Dataset;
  :func:`write_scaling_report` writes them as netCDF, a seaborn figure and a Markdown table::

      from tesla_func.benchmarking import scaling_curves, write_scaling_report
      curves = scaling_curves(lambda T: {**my_args, "batches": my_batches[:T]}, steps=(5, 10, 20))
      write_scaling_report(curves, "results/mine", "scaling_mine")
      kept = keep_graphs_curves(lambda T: {**my_args, "batches": my_batches[:T]}, steps=10,
                                keep=(0, 2, 5, 10))
      write_scaling_report(kept, "results/mine", "keep_graphs_mine")

- ``pytest tests/ --benchmark-only``: ``tests/test_benchmarks.py`` measures one point (method, T),
  or (method, k), per test under pytest-benchmark, with the pieces below:

- :class:`ScalingConfig`: the problem sizes (ConvNet depth 3 on 3x32x32 inputs, a batch of 100
  synthetic images, width 32 on CPU / 128 on CUDA), the T values, and the k values of the
  keep_graphs benchmark and its T, overridable by environment variables ``TESLA_BENCH_<FIELD>``
  (or the pytest options of ``tests/conftest.py``);
- :func:`matching_args`: the problem itself (random expert checkpoints and images, seeded);
- :func:`measure_rss`: the process peak RSS of one call, in a fresh subprocess
  (``python -m tesla_func.benchmarking``), next to the library's deterministic live-tensor count;
- :func:`scaling_results`, :func:`scaling_table`, :func:`keep_graphs_table`,
  :func:`write_scaling_report`: the curves as an xarray Dataset (dims method x steps, or method x
  keep_graphs) saved as netCDF with provenance, a seaborn figure drawn from the saved file, and a
  Markdown table of memory, time (and for k, predicted FLOPs) ratios to ``unrolled``.

    pytest tests/ --benchmark-only      # full sizes; writes results/benchmarks/scaling_<device>.*
                                        # and results/benchmarks/keep_graphs_<device>.*
    pytest tests/                       # tiny sizes, once each: the benchmark code as a smoke test
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from tesla_func.matching import KEEP_METHODS, METHODS, match_trajectory
from tesla_func.memory import measure_peak_memory, predict_cost
from tesla_func.models import ConvNet, init_params
from tesla_func.plots import plot_scaling
from tesla_func.results import markdown_table, records_to_results, write_outputs

ENV_PREFIX = "TESLA_BENCH_"
REFERENCE = "unrolled"  # every ratio in the table is to this method
KEEP_DIM = "keep_graphs"  # the dim of the keep_graphs benchmark (k at a fixed T)
MIB = 2**20
# The targets, checked in the table (never asserted: wall time on a shared machine is
# noise).
MEMORY_GROWTH_TARGET = 1.10  # constant-memory methods: peak at the largest T / at the smallest
PEAK_RATIO_TARGET = 10.0  # unrolled peak / constant-memory peak at the largest T (CPU, T = 40)
TIME_TARGETS = {"tesla": 1.25, "exact": 1.30}  # constant-memory methods: time / unrolled time


@dataclass(frozen=True)
class ScalingConfig:
    """One scaling benchmark: a ConvNet matching problem and the T values to run it at."""

    device: str = "cpu"
    width: int = 32  # ConvNet feature maps (the paper's 128 is the CUDA default)
    depth: int = 3  # conv blocks
    channels: int = 3  # input channels C
    image_size: int = 32  # input side H = W, pixels
    num_classes: int = 10  # K
    num_images: int = 100  # synthetic images N; every student step takes all of them
    steps: tuple[int, ...] = (5, 10, 20, 40)  # T values, one point per method each
    rss_steps: tuple[int, ...] = (5, 40)  # T values that also get a fresh-subprocess RSS run (CPU)
    # torch intra-op threads, set for the run and recorded. 1 on CPU: on 2 cores shared with
    # other jobs (load 7-9), 2 threads ran every method 4x slower at 4x the CPU time (OpenMP
    # threads spin at barriers waiting for a descheduled sibling). TESLA_BENCH_THREADS=2 when idle.
    threads: int = 1
    rounds: int = 3  # timed calls per point, one per method in turn; the fastest is kept
    lr: float = 0.01  # student learning rate beta
    seed: int = 0
    # The keep_graphs benchmark: time and memory of tesla and exact against k at one T, unrolled
    # at that T as the reference (k = T: exact does unrolled's work and holds its memory).
    keep_steps: int = 10  # its T
    keep_graphs: tuple[int, ...] = (0, 2, 5, 10)  # its k values (final steps whose graphs are kept)

    def __post_init__(self) -> None:
        for name in ("width", "depth", "channels", "image_size", "num_classes", "num_images",
                     "threads", "rounds", "keep_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ScalingConfig.{name} must be an int >= 1, got {value!r}")
        if not self.steps or any(t < 1 for t in self.steps):
            raise ValueError(f"ScalingConfig.steps must be T values >= 1, got {self.steps!r}")
        if any(k < 0 for k in self.keep_graphs):
            raise ValueError(f"ScalingConfig.keep_graphs must be k values >= 0, got "
                             f"{self.keep_graphs!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_config(device: str | None = None, *, full: bool = True) -> ScalingConfig:
    """The issue's sizes on ``device`` (default: CUDA if present), or tiny ones for a smoke run.

    Full, CPU: width 32, T in (5, 10, 20, 40), RSS at the smallest and largest T.
    Full, CUDA: width 128, T up to 80 (RSS is a CPU measurement only).
    Smoke (``full=False``): width 4, 8 images of 3x16x16, T in (1, 2, 4), keep_graphs k in
    (0, 2, 4) at T = 4: seconds, not minutes.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not full:
        return ScalingConfig(device=device, width=4, image_size=16, num_images=8, steps=(1, 2, 4),
                             rss_steps=(4,) if device == "cpu" else (), keep_steps=4,
                             keep_graphs=(0, 2, 4))
    if torch.device(device).type == "cuda":
        return ScalingConfig(device=device, width=128, steps=(5, 10, 20, 40, 80), rss_steps=())
    return ScalingConfig(device=device)


def resolve_config(*, full: bool, overrides: Mapping[str, str | None] | None = None,
                   environ: Mapping[str, str] | None = None) -> ScalingConfig:
    """:func:`default_config` with per-field overrides from ``overrides`` (e.g. pytest options;
    None = not given), else from ``TESLA_BENCH_<FIELD>`` environment variables.

    Values are strings as typed: ``"64"``, ``"5,10,20"`` (tuples), ``"cuda"``; an empty string
    gives an empty tuple (``TESLA_BENCH_RSS_STEPS=`` turns the RSS runs off).
    """
    environ = os.environ if environ is None else environ
    fields = dataclasses.fields(ScalingConfig)
    given = {f.name: environ.get(ENV_PREFIX + f.name.upper()) for f in fields}
    given.update({k: v for k, v in (overrides or {}).items() if v is not None})
    base = default_config(given.pop("device", None) or None, full=full)
    changes = {}
    for field in dataclasses.fields(ScalingConfig):
        text = given.get(field.name)
        if text is None:
            continue
        default = getattr(base, field.name)
        try:
            if isinstance(default, tuple):
                changes[field.name] = tuple(int(t) for t in text.replace(",", " ").split())
            else:
                changes[field.name] = type(default)(text)
        except ValueError as err:
            flag = "--bench-" + field.name.replace("_", "-")
            raise ValueError(f"{ENV_PREFIX}{field.name.upper()} / {flag} = {text!r} is not a valid "
                             f"{type(default).__name__}: {err}") from err
    return dataclasses.replace(base, **changes)


# ----------------------------------------------------------------------------------------------
# The problem and its measurements.


def matching_args(cfg: ScalingConfig, steps: int) -> dict[str, Any]:
    """Keyword arguments of :func:`~tesla_func.matching.match_trajectory` for a T-step problem.

    Random expert checkpoints (the target a little way along a random direction, as after an epoch
    or two), random images, balanced hard labels, and the whole set as every step's batch. The
    same seed gives the same problem on every call, in every process.
    """
    gen = torch.Generator().manual_seed(cfg.seed)  # drawn on the CPU: the same on every device
    model = ConvNet(channels=cfg.channels, num_classes=cfg.num_classes,
                    image_size=cfg.image_size, width=cfg.width, depth=cfg.depth)
    start = init_params(model, gen)
    target = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    side = cfg.image_size
    images = torch.randn(cfg.num_images, cfg.channels, side, side, generator=gen)
    labels = torch.arange(cfg.num_images) % cfg.num_classes
    device = torch.device(cfg.device)
    return {
        "model": model.to(device),
        "start": {k: v.to(device) for k, v in start.items()},
        "target": {k: v.to(device) for k, v in target.items()},
        "images": images.to(device),
        "labels": labels.to(device),
        "beta": torch.tensor(cfg.lr, device=device),
        "batches": [torch.arange(cfg.num_images, device=device)] * steps,
    }


def synchronize(device: str) -> None:
    """Wait for queued kernels, so that a timer read after a call includes them."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Tensors of a few MB land on the malloc heap, which keeps freed pages: after the T=40
    ``unrolled`` point this process would sit on ~10 GB while the next point's subprocess
    allocates as much again. Called between points, never inside a timed call.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def _proc_status_bytes(key: str) -> int:
    """A ``VmRSS``/``VmHWM``-style line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise KeyError(f"/proc/self/status has no {key}")


def _rss_of_call(cfg: ScalingConfig, method: str, steps: int) -> dict[str, Any]:
    """In *this* process: peak RSS of one matching call above the RSS just before it.

    A one-step call of the same shapes runs first, so that one-off allocations (kernel caches)
    are in the baseline, not in the method's cost; the pages it freed are handed back before the
    baseline is read, so the call pays for every page it touches. The peak is
    reset through /proc/self/clear_refs (Linux); elsewhere ru_maxrss, which never resets, is all
    there is, and the difference to it is only a lower bound.
    """
    torch.set_num_threads(cfg.threads)
    args = matching_args(cfg, steps)
    match_trajectory(**{**args, "batches": args["batches"][:1]}, method=method)
    release_freed_memory()  # the warm-up's freed heap pages would hide the call's own
    try:
        base = _proc_status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        how = "VmHWM after clear_refs"
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        how = "ru_maxrss (lower bound)"
    match_trajectory(**args, method=method)
    if how.startswith("VmHWM"):
        peak = _proc_status_bytes("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return {"rss_bytes": max(peak - base, 0), "rss_peak_bytes": peak, "rss_base_bytes": base,
            "rss_how": how}


def measure_rss(cfg: ScalingConfig, method: str, steps: int, *,
                timeout: float = 1800) -> dict[str, Any]:
    """Process peak RSS of one ``method`` call at T = ``steps``, measured in a fresh subprocess.

    Returns ``rss_bytes`` (peak above the RSS before the call), ``rss_peak_bytes`` (the process
    peak), ``rss_base_bytes`` and ``rss_how``. Raises ``RuntimeError`` with the child's stderr if
    it fails (an out-of-memory kill shows as a negative return code).
    """
    request = json.dumps({"config": cfg.to_dict(), "method": method, "steps": steps})
    proc = subprocess.run([sys.executable, "-m", "tesla_func.benchmarking", request],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS subprocess for {method} at T={steps} failed with code "
                           f"{proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Collected points -> Dataset -> netCDF, figure and table.


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


def _side_by_side(points: Mapping[Any, Mapping[str, Any]], *, rounds: int, device: str,
                  count_flops: bool = False) -> dict[Any, dict[str, Any]]:
    """Measure each point (key -> the keyword arguments of ``match_trajectory``, method
    included): once under :func:`~tesla_func.memory.measure_peak_memory` (also the warm-up; with
    ``count_flops`` its FLOPs predicted too), then ``rounds`` timed calls, point by point in turn,
    of which the fastest is kept: every point sees the same load. Returns key -> record."""
    records = {}
    for key, kwargs in points.items():
        release_freed_memory()
        result, peak = measure_peak_memory(match_trajectory, **kwargs, device=device)
        records[key] = {"peak_bytes": peak.peak_bytes, "memory_kind": peak.kind,
                        "loss": float(result.loss), "time_s": math.inf, "cpu_s": math.inf}
        if count_flops:
            records[key]["flops"] = predict_cost(match_trajectory, **kwargs)[1].flops
    for _ in range(rounds):
        for key, kwargs in points.items():
            wall, cpu = time.perf_counter(), time.process_time()
            match_trajectory(**kwargs)
            synchronize(device)
            record = records[key]
            record["time_s"] = min(record["time_s"], time.perf_counter() - wall)
            record["cpu_s"] = min(record["cpu_s"], time.process_time() - cpu)
    return records


def scaling_curves(
    make_args: Callable[[int], Mapping[str, Any]] | ScalingConfig,
    *,
    steps: Sequence[int] = (5, 10, 20, 40),
    methods: Sequence[str] = tuple(METHODS),
    rounds: int = 3,
    device: str = "cpu",
    sizes: str = "",
) -> xr.Dataset:
    """Peak memory and wall time of every method at every T, measured side by side.

    ``make_args(T)`` returns the keyword arguments of ``match_trajectory`` (everything but
    ``method``) for a T-step problem; a :class:`ScalingConfig` stands for its ConvNet problem (and
    its steps, rounds and device). At each T, each method runs once under
    :func:`~tesla_func.memory.measure_peak_memory` (also the warm-up), then ``rounds`` timed
    calls, method by method in turn, of which the fastest is kept: the methods see the same load.
    Returns a Dataset over (method, steps) with ``time_s``, ``cpu_s``, ``peak_bytes`` and
    ``loss`` (the same for every method at a T: a sanity check), ready for
    :func:`write_scaling_report`; ``sizes`` describes the problem in its table.
    """
    cfg = None
    if isinstance(make_args, ScalingConfig):
        cfg = make_args
        steps, rounds, device = cfg.steps, cfg.rounds, cfg.device

        def make_args(t: int, cfg: ScalingConfig = cfg) -> dict[str, Any]:
            return matching_args(cfg, t)

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    if rounds < 1 or not steps or min(steps) < 1:
        raise ValueError(f"need rounds >= 1 and T values >= 1, got {rounds} and {steps}")
    records = []
    for t in tqdm(steps, desc="scaling", unit="T"):
        args = dict(make_args(t))
        at_t = _side_by_side({m: {**args, "method": m} for m in methods}, rounds=rounds,
                             device=device)
        records += [{"method": m, "steps": t, **r} for m, r in at_t.items()]
    config = cfg if cfg is not None else {"steps": list(steps), "methods": list(methods),
                                          "rounds": rounds, "device": device}
    kinds = sorted({r["memory_kind"] for r in records})
    ds = scaling_results(records, config, device=device, memory_kind=", ".join(kinds),
                         rounds=rounds, threads=torch.get_num_threads())
    if sizes:
        ds.attrs["sizes"] = sizes
    return ds


def keep_graphs_curves(
    make_args: Callable[[int], Mapping[str, Any]] | ScalingConfig,
    *,
    steps: int = 10,
    keep: Sequence[int] = (0, 2, 5, 10),
    methods: Sequence[str] = KEEP_METHODS,
    rounds: int = 3,
    device: str = "cpu",
    sizes: str = "",
) -> xr.Dataset:
    """Peak memory, wall time and predicted FLOPs of ``tesla`` and ``exact`` against
    ``keep_graphs`` k at one T, with ``unrolled`` at that T as the reference, measured side by
    side.

    ``make_args(T)`` is as for :func:`scaling_curves` (a :class:`ScalingConfig` stands for its
    ConvNet problem at ``keep_steps`` with its ``keep_graphs``, rounds and device). ``unrolled``
    and every point (k, method) run once under :func:`~tesla_func.memory.measure_peak_memory` (and
    have their FLOPs predicted), then ``rounds`` timed calls, point by point in turn; the fastest
    is kept. Returns a Dataset over (method,
    keep_graphs) with ``time_s``, ``cpu_s``, ``peak_bytes``, ``flops`` and ``loss`` (``unrolled``
    ignores k: its one measurement at every k), ready for :func:`write_scaling_report`.
    """
    cfg = None
    if isinstance(make_args, ScalingConfig):
        cfg = make_args
        steps, keep, rounds, device = cfg.keep_steps, cfg.keep_graphs, cfg.rounds, cfg.device

        def make_args(t: int, cfg: ScalingConfig = cfg) -> dict[str, Any]:
            return matching_args(cfg, t)

    unknown = [m for m in methods if m not in KEEP_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods {unknown or list(methods)} take no keep_graphs; those that do: "
                         f"{list(KEEP_METHODS)}")
    if rounds < 1 or steps < 1 or not keep or min(keep) < 0:
        raise ValueError(f"need rounds >= 1, T >= 1 and k values >= 0, got {rounds}, {steps} "
                         f"and {keep}")
    args = dict(make_args(steps))
    points = {(REFERENCE, None): {**args, "method": REFERENCE}}
    points.update({(m, k): {**args, "method": m, "keep_graphs": k} for k in keep for m in methods})
    measured = _side_by_side(points, rounds=rounds, device=device, count_flops=True)
    records = _at_every_keep([{"method": m, KEEP_DIM: k, **r} for (m, k), r in measured.items()],
                             keep)
    config = cfg if cfg is not None else {"steps": steps, "keep_graphs": list(keep),
                                          "methods": list(methods), "rounds": rounds,
                                          "device": device}
    kinds = sorted({r["memory_kind"] for r in records})
    ds = scaling_results(records, config, device=device, dim=KEEP_DIM,
                         memory_kind=", ".join(kinds), rounds=rounds,
                         threads=torch.get_num_threads())
    ds.attrs["steps"] = steps
    if sizes:
        ds.attrs["sizes"] = sizes
    return ds


def main(argv: Sequence[str]) -> None:
    """Subprocess entry of :func:`measure_rss`: one JSON request in, one JSON line out."""
    request = json.loads(argv[0])
    cfg = ScalingConfig(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in request["config"].items()})
    print(json.dumps(_rss_of_call(cfg, request["method"], int(request["steps"]))))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Throughput: distillation iterations/s and evaluation epochs/s, this tree against an earlier
commit, measured side by side in one session.

Each point (setting, code) runs :mod:`tesla_func.benchmarking.worker` in a fresh process:
random data and random expert trajectories of the setting's shapes (no files); evaluation epochs
on the initial set (one untimed, ``eval_epochs`` timed), then ``warmup`` distillation iterations
and ``iterations`` timed ones (the fastest is kept). ``code`` is ``"after"`` (this tree) or
``"before"`` (the ``baseline`` commit, extracted with ``git archive`` into a temporary folder and put first on the
worker's ``PYTHONPATH``); every round runs before, then after, so both see the same load, and the
fastest round of each is kept. Every tree runs its own defaults (before: keep_graphs 0; after:
"auto"), with the method and sizes of the setting.

Settings (:data:`SETTINGS`): ``main``, the main job's distillation (experiments/ablate_labels.py:
Fashion-MNIST's 1x28x28 shape, ConvNet width 32 depth 3, IPC 10, batch_syn 20, T 20, exact);
``paper``, the paper's CIFAR-10 size (3x32x32, width 128, IPC 10, batch 100, T 30); ``tiny``, the
smoke test's. :func:`write_throughput_report` writes ``throughput_<device>.{nc,png,md}``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from tesla_func.benchmarking import worker
from tesla_func.benchmarking.config import ENV_PREFIX, overridden
from tesla_func.benchmarking.report import _load_average
from tesla_func.results import markdown_table, records_to_results, write_outputs

CODES = ("before", "after")
WORKER = Path(worker.__file__)
# The commit before issue 22's changes (main at the time): what "before" runs by default.
BASELINE = "1a23a51"


@dataclass(frozen=True)
class Setting:
    """One distillation set-up whose throughput is measured (random data of this shape)."""

    dataset: str  # the name the fake data and experts carry
    channels: int
    image_size: int
    num_classes: int
    width: int
    depth: int
    ipc: int
    batch_syn: int
    syn_steps: int
    method: str = "exact"
    iterations: int = 3  # timed distillation iterations (after the warm-up)
    eval_epochs: int = 10  # timed evaluation epochs (after one)

    def describe(self) -> str:
        return (f"{self.dataset} {self.channels}x{self.image_size}x{self.image_size}, ConvNet "
                f"width {self.width} depth {self.depth}, IPC {self.ipc}, batch {self.batch_syn}, "
                f"T {self.syn_steps}, {self.method}")


SETTINGS: dict[str, Setting] = {
    "main": Setting("fashion-mnist", 1, 28, 10, 32, 3, ipc=10, batch_syn=20, syn_steps=20,
                    eval_epochs=30),
    "paper": Setting("cifar10", 3, 32, 10, 128, 3, ipc=10, batch_syn=100, syn_steps=30,
                     iterations=1, eval_epochs=3),
    "tiny": Setting("digits", 1, 8, 3, 4, 1, ipc=2, batch_syn=4, syn_steps=3, iterations=1,
                    eval_epochs=1),
}


@dataclass(frozen=True)
class ThroughputConfig:
    """A throughput session: which settings, on which device, against which commit."""

    device: str = "cpu"
    settings: tuple[str, ...] = ("main", "paper")
    baseline: str = BASELINE  # the git revision "before" runs ("" for none)
    threads: int = 1  # torch threads of every worker (1: the shared 2-core CPU; see ScalingConfig)
    rounds: int = 2  # before, after; before, after; ... the fastest of each is kept
    warmup: int = 1  # untimed distillation iterations first (start-up choices included)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown or not self.settings:
            raise ValueError(f"ThroughputConfig.settings {list(self.settings)}: known settings "
                             f"are {list(SETTINGS)}")
        for name in ("threads", "rounds", "warmup"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "warmup" else 1):
                raise ValueError(f"ThroughputConfig.{name} must be an int, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def throughput_config(*, full: bool, device: str | None = None,
                      environ: Mapping[str, str] | None = None) -> ThroughputConfig:
    """The session's config: the main job's and the paper's settings (``full``), or the tiny one
    against no baseline (a smoke run), with overrides from ``TESLA_BENCH_THROUGHPUT_<FIELD>``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = (ThroughputConfig(device=device) if full
            else ThroughputConfig(device=device, settings=("tiny",), baseline="", rounds=1))
    environ = os.environ if environ is None else environ
    prefix = ENV_PREFIX + "THROUGHPUT_"
    given = {f.name: environ.get(prefix + f.name.upper()) for f in dataclasses.fields(base)}
    return overridden(base, given, prefix)


def request(cfg: ThroughputConfig, setting: str) -> dict[str, Any]:
    """The worker's request for one setting."""
    return {**dataclasses.asdict(SETTINGS[setting]), "device": cfg.device,
            "threads": cfg.threads, "warmup": cfg.warmup, "seed": cfg.seed, "expert_epochs": 3}


def baseline_tree(revision: str, into: Path, repository: Path | None = None) -> Path:
    """The files of ``revision`` of this repository (``git archive``), extracted under ``into``.
    Raises RuntimeError when there is no git or no such revision."""
    repository = repository or Path(__file__).resolve().parents[2]
    proc = subprocess.run(["git", "-C", str(repository), "archive", "--format=tar", revision],
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"git archive {revision} in {repository} failed: "
                           f"{proc.stderr.decode(errors='replace')[-500:]}")
    tree = into / f"tesla_func-{revision}"
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def run_worker(req: Mapping[str, Any], tree: Path, *, timeout: float = 3600) -> dict[str, Any]:
    """One point in a fresh process on the code in ``tree`` (first on its PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tree), *filter(None, [os.environ.get("PYTHONPATH", "")])]),
           "OMP_NUM_THREADS": str(req["threads"])}
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(dict(req))], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"throughput worker on {tree} failed with code {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def this_tree() -> Path:
    """The folder holding the ``tesla_func`` package this process imported."""
    return Path(__file__).resolve().parents[2]


def measure_throughput(cfg: ThroughputConfig) -> list[dict[str, Any]]:
    """Every (setting, code) point, rounds interleaved (before, after, before, ...); the fastest
    of each kept. Without a baseline (``cfg.baseline`` empty or not extractable) only "after"
    runs, and the reason is in each record's ``note``."""
    note = ""
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"after": this_tree()}
        if cfg.baseline:
            try:
                trees["before"] = baseline_tree(cfg.baseline, Path(tmp))
            except RuntimeError as err:
                note = f"no baseline: {err}"
        else:
            note = "no baseline asked for"
        best: dict[tuple[str, str], dict[str, Any]] = {}
        for _ in range(cfg.rounds):
            for setting in cfg.settings:
                for code in (c for c in CODES if c in trees):
                    got = run_worker(request(cfg, setting), trees[code])
                    key = (setting, code)
                    if key not in best or got["iteration_s"] < best[key]["iteration_s"]:
                        best[key] = {**best.get(key, {}), **got}
                    for name in ("eval_epoch_s", "eval_epoch_cpu_s", "iteration_cpu_s"):
                        best[key][name] = min(best[key][name], got[name])
    return [{"setting": s, "code": c, "revision": cfg.baseline if c == "before" else "this tree",
             "note": note, **r} for (s, c), r in best.items()]


VARIABLES = {
    "iterations_per_s": ("iteration_s", "distillation iterations per second (wall, fastest)"),
    "cpu_iterations_per_s": ("iteration_cpu_s", ("distillation iterations per CPU second "
                                                 "(this process, all threads)")),
    "eval_epochs_per_s": ("eval_epoch_s", "evaluation epochs per second (wall, one model)"),
    "cpu_eval_epochs_per_s": ("eval_epoch_cpu_s", "evaluation epochs per CPU second"),
}


def throughput_results(records: Sequence[Mapping[str, Any]], cfg: ThroughputConfig,
                       **attrs: Any) -> xr.Dataset:
    """Records -> a Dataset over (setting, code) with the rates, the keep_graphs each tree ran
    with, the first iteration's time (start-up included) and the setting's sizes."""
    rows = []
    for r in records:
        row = {"setting": r["setting"], "code": r["code"], "keep_graphs": float(r["keep_graphs"]),
               "first_iteration_s": r["first_iteration_s"], "loss": r["loss"]}
        row.update({name: 1.0 / r[key] for name, (key, _) in VARIABLES.items()})
        rows.append(row)
    ds = records_to_results(rows, ["setting", "code"], config=cfg.to_dict(), seed=cfg.seed,
                            device=cfg.device, threads=cfg.threads, rounds=cfg.rounds,
                            baseline=cfg.baseline,
                            notes=sorted({r["note"] for r in records if r["note"]}), **attrs)
    ds = ds.reindex(code=[c for c in CODES if c in ds["code"].values])
    for name, (_, long_name) in VARIABLES.items():
        ds[name] = ds[name].astype(np.float64)
        ds[name].attrs.update(units="1/s", long_name=long_name)
    ds["keep_graphs"].attrs["long_name"] = "keep_graphs the tree ran with (auto: its choice)"
    ds["first_iteration_s"].attrs.update(units="s", long_name="the first (warm-up) iteration, "
                                                               "start-up choices included")
    ds.attrs["settings"] = {s: SETTINGS[s].describe() for s in ds["setting"].values.tolist()}
    return ds


def throughput_table(ds: xr.Dataset) -> str:
    """Markdown: per setting and code, the rates and the after / before speed-ups."""

    def at(var: str, setting: str, code: str) -> float:
        if code not in ds["code"].values:
            return math.nan
        return float(ds[var].sel(setting=setting, code=code))

    rows = []
    for s in ds["setting"].values.tolist():
        for c in ds["code"].values.tolist():
            row = [s, c, at("keep_graphs", s, c)]
            for var in ("iterations_per_s", "cpu_iterations_per_s", "eval_epochs_per_s"):
                row += [at(var, s, c), at(var, s, c) / at(var, s, "before")]
            rows.append(row + [at("first_iteration_s", s, c)])
    table = markdown_table(
        ["setting", "code", "keep_graphs", "iterations/s", "x before", "iterations/CPU s",
         "x before", "eval epochs/s", "x before", "first iteration (s)"], rows)
    sizes = "\n".join(f"- `{k}`: {v}" for k, v in ds.attrs.get("settings", {}).items())
    return (f"{table}\n\nbefore = git revision `{ds.attrs.get('baseline') or '-'}` with its "
            f"defaults (keep_graphs 0), after = this tree with its own (keep_graphs auto), each "
            f"in a fresh process on random data of the setting's shapes, interleaved round by "
            f"round ({ds.attrs.get('rounds')} rounds; fastest kept); torch threads: "
            f"{ds.attrs.get('threads')}; load average {ds.attrs.get('load_average_start')} at "
            f"the start, {ds.attrs.get('load_average_end')} at the end.\n\n{sizes}")


@dataclass
class ThroughputRun:
    """The throughput records of one benchmark session (``full``: the issue's settings)."""

    config: ThroughputConfig
    full: bool
    records: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    load_at_start: tuple[float, ...] = field(default_factory=_load_average)
    report: dict[str, Path] | None = None  # what write_throughput_report wrote, once it has

    def dataset(self) -> xr.Dataset:
        return throughput_results(self.records, self.config, full_sizes=self.full,
                                  session_wall_s=time.time() - self.started,
                                  load_average_start=list(self.load_at_start),
                                  load_average_end=list(_load_average()))


def plot_throughput(path: str | Path, out_png: str | Path):
    """Bars of iterations/s and evaluation epochs/s per setting, before and after."""
    # where used: seaborn and matplotlib cost 1-2 s at start-up
    import seaborn as sns
    from matplotlib.figure import Figure

    from tesla_func.plots.style import STYLE, long_frame, save_png
    from tesla_func.results import load_results

    ds = load_results(path)
    panels = ("iterations_per_s", "eval_epochs_per_s")
    with sns.axes_style(STYLE):
        fig = Figure(figsize=(5.5 * len(panels), 4.0), layout="constrained")
        for ax, var in zip(fig.subplots(1, len(panels)), panels):
            frame = long_frame(ds[var], ["code"])
            sns.barplot(data=frame, x="setting", y=var, hue="code", ax=ax)
            ax.set_yscale("log")
            ax.set_ylabel(f"{var.replace('_', ' ')} (log)")
        fig.suptitle(f"throughput on {ds.attrs.get('device')}")
    return save_png(fig, out_png)


def write_throughput_report(ds: xr.Dataset, out_dir: str | Path, name: str) -> dict[str, Path]:
    """``<name>.nc`` (provenance included), ``.png`` and ``.md`` (:func:`throughput_table`)."""
    return write_outputs(ds, name, Path(out_dir), table=throughput_table(ds), plot=plot_throughput,
                         notes=f"torch {ds.attrs.get('version_torch')}.")

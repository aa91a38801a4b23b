"""A first run as a new user makes it: the command line with only the required flags.

    python experiments/first_run.py                       # Fashion-MNIST, IPC 1 and 10
    python experiments/first_run.py --dataset digits      # seconds, not minutes

Runs exactly these commands (``tesla_func.cli.main``, in this process), every option at its
default, which for a built-in dataset are that dataset's defaults
(:mod:`tesla_func.data.defaults`)::

    tesla-func experts --dataset DATASET --out WORK/experts
    tesla-func distill --experts-dir WORK/experts --ipc IPC --out WORK/ipcIPC
    tesla-func evaluate --synthetic WORK/ipcIPC/synthetic.safetensors --out WORK/...nc
    tesla-func evaluate --random-real IPC --dataset DATASET --out WORK/...nc

``--ipc`` is the one flag added to ``distill`` (without it, IPC is 1). Both evaluations are
``evaluate``'s default protocol (5 networks, 1000 epochs, lr x 0.1 at half, DSA): the distilled
set at its learned lr, random real at 0.01, the same networks. WORK is a folder under the cache
(``tesla_func.experiment.cache_dir``) named by the dataset and the library's fingerprint, so a
killed run resumes there and a run of other code starts afresh. Writes
results/first_run/first_run.{nc,png,md}: test accuracy (mean +- std over the 5 networks), the
learned lr, the defaults the runs chose (and why), and the wall time of every command.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from tesla_func import cli
from tesla_func.experiment import cache_dir, cache_fingerprint, run_experiment
from tesla_func.plots import plot_bar
from tesla_func.results import load_results, make_results, markdown_table
from tesla_func.synthetic import load_synthetic

NAME = "first_run"
SOURCES = ("distilled", "random real")


@dataclass(frozen=True)
class FirstRunConfig:
    dataset: str = "fashion-mnist"  # a built-in dataset: its defaults are what is measured
    ipcs: tuple[int, ...] = (1, 10)  # the --ipc of each distillation (and its random real size)
    threads: int = 0  # torch CPU threads; 0 = torch's default (two on this machine)


PRESETS: dict[str, FirstRunConfig] = {}  # nothing to scale: the point is the defaults


def _work_dir(cfg: FirstRunConfig) -> Path:
    """Where the runs are made: keyed by the dataset and the code that makes them."""
    key = hashlib.sha256(json.dumps(cache_fingerprint(), sort_keys=True).encode()).hexdigest()
    return cache_dir() / NAME / f"{cfg.dataset}-{key[:12]}"


def _command(argv: list[str]) -> float:
    """Run one ``tesla-func`` command (its output shown); its wall time in seconds."""
    print("$ tesla-func " + " ".join(argv), flush=True)
    tic = time.perf_counter()
    status = cli.main(argv)
    if status != 0:
        raise RuntimeError(f"`tesla-func {' '.join(argv)}` exited with status {status}")
    return time.perf_counter() - tic


def _accuracies(path: Path) -> np.ndarray:
    """The per-network test accuracies that ``evaluate --out`` wrote, as fractions."""
    return load_results(path)["accuracy"].values.reshape(-1)


def main(cfg: FirstRunConfig) -> xr.Dataset:
    work = _work_dir(cfg)
    experts = work / "experts"
    seconds: dict[str, float] = {}
    if not (experts / "config.toml").exists() or not list(experts.glob("expert_*.safetensors")):
        seconds["experts"] = _command(["experts", "--dataset", cfg.dataset, "--out", str(experts)])
    accuracy = np.full((len(cfg.ipcs), len(SOURCES), 5), np.nan)
    learned_lr, chosen, architecture = [], {}, {}
    for i, ipc in enumerate(cfg.ipcs):
        run = work / f"ipc{ipc}"
        if not (run / "synthetic.safetensors").exists():
            seconds[f"distill ipc {ipc}"] = _command(
                ["distill", "--experts-dir", str(experts), "--ipc", str(ipc), "--out", str(run)])
        synthetic = load_synthetic(run / "synthetic.safetensors")
        learned_lr.append(synthetic.lr)
        chosen[f"ipc {ipc}"] = synthetic.header.get("defaults", {})
        architecture = synthetic.header.get("architecture", {})
        for j, (source, argv) in enumerate((
            ("distilled", ["--synthetic", str(run / "synthetic.safetensors")]),
            ("random real", ["--random-real", str(ipc), "--dataset", cfg.dataset]),
        )):
            out = work / f"evaluate-ipc{ipc}-{source.replace(' ', '-')}.nc"
            if not out.exists():
                seconds[f"evaluate ipc {ipc} {source}"] = _command(
                    ["evaluate", *argv, "--out", str(out)])
            values = _accuracies(out)
            accuracy[i, j, : len(values)] = values
    return make_results(
        {
            "accuracy": (("ipc", "source", "model"), accuracy, {"units": "fraction"}),
            "lr": (("ipc",), np.asarray(learned_lr), {"long_name": "the set's learned beta"}),
        },
        coords={"ipc": list(cfg.ipcs), "source": list(SOURCES), "model": np.arange(5)},
        config=cfg,
        seed=0,
        device="cpu",
        dataset=cfg.dataset,
        defaults_chosen=json.dumps(chosen, sort_keys=True),
        architecture=json.dumps(architecture, sort_keys=True),
        seconds=json.dumps(seconds),
    )


def table(ds: xr.Dataset) -> str:
    rows = []
    for ipc in ds["ipc"].values.tolist():
        at = ds["accuracy"].sel(ipc=ipc)
        cells = [f"{100 * float(at.sel(source=s).mean()):.1f} ± "
                 f"{100 * float(at.sel(source=s).std()):.1f}" for s in SOURCES]
        gain = 100 * float(at.sel(source="distilled").mean() - at.sel(source="random real").mean())
        rows.append([ipc, *cells, f"{gain:+.1f}", f"{float(ds['lr'].sel(ipc=ipc)):.3g}"])
    head = markdown_table(["IPC", "distilled (%)", "random real (%)", "gain (points)",
                           "learned lr"], rows)
    seconds = json.loads(ds.attrs["seconds"])
    times = ", ".join(f"{name} {s:.0f} s" if s < 60 else f"{name} {s / 60:.1f} min"
                      for name, s in seconds.items())
    chosen = json.loads(ds.attrs["defaults_chosen"])
    first = next(iter(chosen.values()), {})
    defaults = "\n".join(f"- `{name}`: {why}" for name, why in sorted(first.items()))
    return (f"{head}\n\nTest accuracy, mean ± std over `evaluate`'s 5 networks (1000 epochs, "
            f"the set's learned lr; random real at 0.01). Wall time of each command made here: "
            f"{times or 'all reused from the work folder'}.\n\nWhat the defaults chose for the "
            f"distillation (the first IPC; the run's saved record):\n\n{defaults}")


def plot(nc: Path, png: Path) -> None:
    plot_bar(nc, png, x="ipc", hue="source", replicate=("model",), ddof=0,
             title="Only the required flags: distilled against random real")


if __name__ == "__main__":
    run_experiment(NAME, FirstRunConfig, PRESETS, __doc__, main, table, plot)

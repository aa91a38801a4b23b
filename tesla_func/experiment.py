"""What every experiment script shares: cached experts, presets, and writing its three outputs.

An experiment is a thin script (``experiments/*.py``) with a frozen config dataclass whose
defaults are the small CPU run, a ``PRESETS`` dict (at least ``"paper"``), and
``main(cfg) -> xarray.Dataset``. It writes under ``results/<name>/``:

- ``<name>.nc``: the results Dataset with its config, seed, versions, git revision and device;
- ``<name>.png``: a seaborn figure drawn from the saved ``.nc`` only;
- ``<name>.md``: a Markdown table of the headline numbers, with the command that made them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import xarray as xr

from tesla_func.augment import DSA
from tesla_func.configargs import add_config_arguments, config_from_args
from tesla_func.data import Dataset
from tesla_func.distill import DistillConfig, Distiller
from tesla_func.evaluate import EvalConfig, EvalResult, evaluate, random_real_subset
from tesla_func.experts import ExpertConfig, train_experts
from tesla_func.fileio import atomic_write_text
from tesla_func.results import save_dataset

CACHE_ENV = "TESLA_FUNC_CACHE"
RESULTS_DIR = Path("results")

Config = TypeVar("Config")


def cache_dir() -> Path:
    """Where trained experts are kept between runs: $TESLA_FUNC_CACHE or ./cache."""
    return Path(os.environ.get(CACHE_ENV, "cache"))


def expert_config(cfg: Any) -> ExpertConfig:
    """The experts of an experiment config with fields dataset, num_experts,
    expert_epochs_trained and width (the other expert settings are PROTOCOL.md's)."""
    return ExpertConfig(
        dataset=cfg.dataset,
        num_experts=cfg.num_experts,
        epochs=cfg.expert_epochs_trained,
        width=cfg.width,
    )


def distill_config(
    cfg: Any,
    experts_dir: Path,
    ipc: int,
    method: str,
    labels: str,
    num_classes: int,
    **changes: Any,
) -> DistillConfig:
    """The DistillConfig of one run of an experiment whose config has the distillation fields
    (iterations, syn_steps, expert_epochs, max_start_epoch, batch_syn_max, lr_img, lr_lr,
    lr_grad_clip, eval_epochs, eval_models, seed, device);
    ``batch_syn = min(ipc * classes, batch_syn_max)``.
    Experiments that agree on these fields produce the same config, hence share the cached run."""
    fields = dict(
        experts_dir=str(experts_dir),
        dataset=cfg.dataset,
        ipc=ipc,
        method=method,
        labels=labels,
        iterations=cfg.iterations,
        syn_steps=cfg.syn_steps,
        expert_epochs=cfg.expert_epochs,
        max_start_epoch=cfg.max_start_epoch,
        batch_syn=min(ipc * num_classes, cfg.batch_syn_max),
        lr_img=cfg.lr_img,
        lr_lr=cfg.lr_lr,
        lr_grad_clip=cfg.lr_grad_clip,
        eval_epochs=cfg.eval_epochs,
        eval_models=cfg.eval_models,
        seed=cfg.seed,
        device=cfg.device,
    )
    return DistillConfig(**{**fields, **changes})


def experts_dir(cfg: ExpertConfig) -> Path:
    """One folder per expert configuration, so experiments that agree on it share the experts."""
    tag = (
        f"{cfg.dataset}-w{cfg.width}-d{cfg.depth}-{cfg.norm}-e{cfg.epochs}-n{cfg.num_experts}"
        f"-lr{cfg.lr:g}-b{cfg.batch_size}-{'dsa' if cfg.dsa else 'nodsa'}-s{cfg.seed}"
    )
    return cache_dir() / "experts" / tag


def ensure_experts(cfg: ExpertConfig, *, device: str = "cpu", progress: bool = True) -> Path:
    """Train the experts of ``cfg`` unless cached (a killed run resumes); return their folder."""
    out = experts_dir(cfg)
    train_experts(cfg, out, device=device, progress=progress)
    return out


def run_dir(cfg: DistillConfig) -> Path:
    """Where the distillation run of ``cfg`` lives: one folder per config (hash of all fields), so
    experiments that ask for the same run share it, and a killed run resumes."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / "runs" / f"{cfg.dataset}-ipc{cfg.ipc}-{cfg.method}-{cfg.labels}-{digest}"


def distill_cached(cfg: DistillConfig, dataset: Dataset | None = None) -> Distiller:
    """Run (or resume, or just reload) the distillation of ``cfg``; returns the finished Distiller."""
    distiller = Distiller(cfg, run_dir(cfg), dataset=dataset)
    distiller.run()
    return distiller


def random_real_baseline(
    dataset: Dataset, ipc: int, protocol: EvalConfig, seed: int = 0
) -> EvalResult:
    """The field's baseline: ``ipc`` random real training images per class with hard labels,
    trained and tested in the same protocol as the distilled sets (DSA on every batch)."""
    images, classes = random_real_subset(
        dataset.train_images, dataset.train_labels, ipc, torch.Generator().manual_seed(seed)
    )
    return evaluate(
        images,
        classes,
        dataset.test_images,
        dataset.test_labels,
        protocol,
        DSA(),
        num_classes=dataset.info.num_classes,
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats with 4 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def percent(mean: float, std: float) -> str:
    """An accuracy fraction pair as the field prints it: '73.2 +- 0.4'."""
    return f"{100 * mean:.1f} +- {100 * std:.1f}"


def command_line() -> str:
    """The command that is running, to be written beside its results."""
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def write_outputs(
    ds: xr.Dataset,
    name: str,
    *,
    plot: Callable[[Path, Path], Any],
    table: str,
    notes: str = "",
    out_dir: Path | None = None,
) -> dict[str, Path]:
    """Write ``<name>.nc``, then the figure (from the saved file) and the Markdown table."""
    out = out_dir or RESULTS_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    ds = ds.copy()
    ds.attrs["command"] = command_line()
    nc = save_dataset(ds, out / f"{name}.nc")
    png = out / f"{name}.png"
    plot(nc, png)
    device = ds.attrs.get("device", "unknown device")
    md = out / f"{name}.md"
    atomic_write_text(
        md,
        f"# {name}\n\nMade by `{ds.attrs['command']}` at git revision "
        f"`{ds.attrs.get('git_revision', 'unknown')}` on {device}.\n\n"
        f"{table}\n\n{notes}".rstrip()
        + "\n",
    )
    return {"netcdf": nc, "figure": png, "table": md}


def parse_config(
    cfg_type: type[Config],
    presets: Mapping[str, Config],
    description: str,
    argv: Sequence[str] | None = None,
) -> Config:
    """Build a config from ``--preset NAME`` and ``--field value`` overrides of its fields."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset",
        choices=sorted(presets),
        default=None,
        help="start from a named preset instead of the small CPU default",
    )
    add_config_arguments(parser, cfg_type)
    args = parser.parse_args(argv)
    return config_from_args(args, cfg_type, presets[args.preset] if args.preset else None)


REDUCED_NOTE = (
    "Reduced CPU protocol (narrow ConvNet, short expert trajectories, few iterations, "
    "shorter evaluation): compare rows with each other, not with published numbers."
)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU thread count set to ``n`` (0: unchanged) for the block, restored after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_experiment(
    name: str,
    cfg_type: type[Config],
    presets: Mapping[str, Config],
    description: str,
    main: Callable[[Config], xr.Dataset],
    table: Callable[[xr.Dataset], str],
    plot: Callable[[Path, Path], Any],
    notes: str = "",
) -> xr.Dataset:
    """The ``__main__`` of an experiment script: config from the command line, run (with the
    config's ``threads``, restored after), write the three outputs (the reduced-protocol note
    added when it applies), print the table."""
    cfg = parse_config(cfg_type, presets, description)
    with torch_threads(getattr(cfg, "threads", 0)):
        results = main(cfg)
    text = table(results)
    if results.attrs.get("protocol") == "reduced":
        notes = f"{notes} {REDUCED_NOTE}".strip()
    paths = write_outputs(results, name, table=text, notes=notes, plot=plot)
    print(text)
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return results

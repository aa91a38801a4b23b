"""What every experiment script shares: cached experts and runs, presets, and its three outputs.

An experiment is a thin script (``experiments/*.py``) with a frozen config dataclass whose
defaults are the small CPU run and which *nests* the library's configs (``experts:
ExpertConfig``, ``distill: DistillConfig``; variants are made with ``dataclasses.replace``), a
``PRESETS`` dict (at least ``"paper"``), and ``main(cfg) -> xarray.Dataset``. Its command line
is derived from the config like every other command's (``--distill.lr-img 300``, ``--ipcs 1 10``:
:mod:`tesla_func.configargs`); ``--config FILE.toml`` takes the same options from a file
(``ipcs = [1, 10]``, a ``[distill]`` table: :mod:`tesla_func.configfile`), and ``--tensorboard
DIR`` logs the experts, runs and baselines it trains through this module to
``DIR/experts/<folder>``, ``DIR/runs/<folder>`` and ``DIR/baselines/`` (:mod:`tesla_func.tracking`;
cached ones are not trained again, so not logged). It writes under ``results/<name>/``:

- ``<name>.nc``: the results with their config, seed, versions, git revision and device;
- ``<name>.png``: a seaborn figure drawn from the saved ``.nc`` only;
- ``<name>.md``: a Markdown table of the headline numbers, with the command that made them;
- ``<name>_sets.png`` (scripts that pass ``sets``): pictures of the synthetic sets it made, drawn
  from the cached runs' files (:func:`tesla_func.plots.plot_experiment_sets` draws the sets a
  results file names in its ``synthetic_sets`` attribute).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import xarray as xr

from tesla_func.augment import DSA
from tesla_func.configargs import add_config_arguments, config_from_args
from tesla_func.configfile import add_config_file_argument, parse_args
from tesla_func.data import Dataset
from tesla_func.distill import DistillConfig, Distiller
from tesla_func.evaluate import EvalConfig, EvalResult, evaluate
from tesla_func.experts import ExpertConfig, train_experts
from tesla_func.fileio import atomic_write_text
from tesla_func.provenance import git_revision
from tesla_func.results import write_outputs
from tesla_func.sampling import per_class_indices
from tesla_func.tracking import RunLogger, add_tensorboard_argument, tensorboard_logger

CACHE_ENV = "TESLA_FUNC_CACHE"
RESULTS_DIR = Path("results")

Config = TypeVar("Config")
# the --tensorboard folder of the experiment running (None: no logging); set by run_experiment
_TENSORBOARD: contextvars.ContextVar[Path | None] = contextvars.ContextVar("tensorboard",
                                                                          default=None)


@contextlib.contextmanager
def _logger(kind: str, name: str) -> Iterator[RunLogger | None]:
    """A TensorBoard logger into ``<--tensorboard>/<kind>/<name>`` for the block, or None."""
    root = _TENSORBOARD.get()
    with tensorboard_logger(None if root is None else root / kind / name) as logger:
        yield logger


def cache_dir() -> Path:
    """Where trained experts and distillation runs are kept between runs: $TESLA_FUNC_CACHE or
    ./cache."""
    return Path(os.environ.get(CACHE_ENV, "cache"))


def cache_fingerprint(device: str = "cpu") -> dict[str, str]:
    """What a cached result depends on besides its config: the library's source code (every
    module, its subpackages' included), torch's
    version, the kind of device and, on CPU, the instruction set torch dispatches to and its
    thread count (a different thread count splits reductions differently, and the last bits
    change). A cached run is reused only when all of these match."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for source in sorted(package.rglob("*.py")):  # the subpackages too (data/, planner/, ...)
        digest.update(source.relative_to(package).as_posix().encode() + b"\0"
                      + source.read_bytes())
    kind = torch.device(device)
    where = (torch.cuda.get_device_name(kind) if kind.type == "cuda" else
             f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    return {"code": digest.hexdigest()[:16], "torch": torch.__version__, "device": where}


def _cached(kind: str, name: str, key: Mapping[str, Any], device: str) -> Path:
    """``cache/<kind>/<name>-<hash of key and fingerprint>``, with ``key.json`` written inside
    on first use, so a folder says what it holds."""
    key = {"config": key, "fingerprint": cache_fingerprint(device)}
    text = json.dumps(key, sort_keys=True, default=str)
    folder = cache_dir() / kind / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    if not (folder / "key.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "key.json", json.dumps(key, indent=1, sort_keys=True,
                                                          default=str))
    return folder


def experts_dir(cfg: ExpertConfig, device: str = "cpu") -> Path:
    """One folder per expert configuration and fingerprint (:func:`cache_fingerprint`), so
    experiments that agree on both share the experts, and stale experts are never reused."""
    tag = f"{cfg.dataset}-w{cfg.width}-e{cfg.epochs}-n{cfg.num_experts}"
    return _cached("experts", tag, cfg.to_dict(), device)


def ensure_experts(cfg: ExpertConfig, *, device: str = "cpu", progress: bool = True) -> Path:
    """Train the experts of ``cfg`` unless cached (a killed run resumes); return their folder."""
    out = experts_dir(cfg, device)
    with _logger("experts", out.name) as logger:
        train_experts(cfg, out, device=device, progress=progress, logger=logger)
    return out


def distill_run(
    base: DistillConfig,
    experts: Path,
    *,
    ipc: int,
    batch_syn_max: int,
    num_classes: int,
    **changes: Any,
) -> DistillConfig:
    """The run ``base`` at ``ipc`` images per class on the experts in ``experts``, with
    ``batch_syn = min(ipc * num_classes, batch_syn_max)`` and any other field ``changes``."""
    return dataclasses.replace(
        base,
        experts_dir=str(Path(experts).resolve()),  # one key however the cache was named
        ipc=ipc,
        batch_syn=min(ipc * num_classes, batch_syn_max),
        **changes,
    )


def run_dir(cfg: DistillConfig) -> Path:
    """Where the distillation run of ``cfg`` lives: one folder per config (all fields) and
    fingerprint (:func:`cache_fingerprint`), so experiments that ask for the same run share it, a
    killed run resumes, and a run made by other code, another torch, device or thread count is
    never reused."""
    return _cached("runs", f"ipc{cfg.ipc}-{cfg.method}-{cfg.label_strategy}", cfg.to_dict(),
                   cfg.device)


def distill_cached(cfg: DistillConfig, dataset: Dataset | None = None) -> Distiller:
    """Run (or resume, or just reload) the distillation of ``cfg``; returns the finished
    Distiller."""
    folder = run_dir(cfg)
    with _logger("runs", folder.name) as logger:
        distiller = Distiller(cfg, folder, dataset=dataset, logger=logger)
        distiller.run()
    return distiller


def random_real_baseline(
    dataset: Dataset, ipc: int, protocol: EvalConfig, seed: int = 0
) -> EvalResult:
    """The field's baseline: ``ipc`` random real training images per class with hard labels,
    trained and tested in the same protocol as the distilled sets (DSA on every batch)."""
    index = per_class_indices(dataset.train_labels, ipc, torch.Generator().manual_seed(seed),
                              dataset.info.num_classes, dataset.info.class_names)
    with _logger("baselines", f"{dataset.info.name}-ipc{ipc}-seed{seed}") as logger:
        return evaluate(
            dataset.train_images[index],
            dataset.train_labels[index],
            dataset.test_images,
            dataset.test_labels,
            protocol,
            DSA(),
            num_classes=dataset.info.num_classes,
            logger=logger,
        )


def parse_config(
    cfg_type: type[Config],
    presets: Mapping[str, Config],
    description: str,
    argv: Sequence[str] | None = None,
) -> Config:
    """Build a config from ``--preset NAME``, a ``--config FILE.toml`` and ``--field value``
    overrides of its fields (nested ones as ``--distill.lr-img``), the command line winning."""
    return _parse(cfg_type, presets, description, argv)[0]


def _parse(
    cfg_type: type[Config],
    presets: Mapping[str, Config],
    description: str,
    argv: Sequence[str] | None,
) -> tuple[Config, argparse.Namespace]:
    """:func:`parse_config`'s config, and the parsed command line (``--tensorboard``)."""
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
    add_config_file_argument(parser)
    add_tensorboard_argument(parser)
    args = parse_args(parser, argv)
    return config_from_args(args, cfg_type, presets[args.preset] if args.preset else None), args


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
    notes: str | Callable[[xr.Dataset], str] = "",
    argv: Sequence[str] | None = None,
    sets: Callable[[Path, Path], Any] | None = None,
) -> xr.Dataset:
    """The ``__main__`` of an experiment script: config from the command line, run (with the
    config's ``threads``, restored after), write the three outputs under ``results/<name>/``
    (``notes`` may be written from the results; the reduced-protocol note is added when it
    applies), print the table. ``sets(nc, png)``, if given, draws the synthetic sets the run
    made into ``results/<name>/<name>_sets.png`` from the saved results file."""
    cfg, args = _parse(cfg_type, presets, description, argv)
    revision = git_revision()
    if revision.endswith("-dirty"):
        print(f"warning: the working tree has uncommitted changes ({revision}); results made "
              "now cannot be rerun from a commit: commit first", file=sys.stderr)
    tensorboard = _TENSORBOARD.set(Path(args.tensorboard) if args.tensorboard else None)
    try:
        with torch_threads(getattr(cfg, "threads", 0)):
            results = main(cfg)
    finally:
        _TENSORBOARD.reset(tensorboard)
    text = table(results)
    notes = notes(results) if callable(notes) else notes
    if results.attrs.get("protocol") == "reduced":
        notes = f"{notes} {REDUCED_NOTE}".strip()
    paths = write_outputs(results, name, RESULTS_DIR / name, table=text, notes=notes, plot=plot)
    if sets is not None:
        paths["sets"] = RESULTS_DIR / name / f"{name}_sets.png"
        sets(paths["netcdf"], paths["sets"])
    print(text + (f"\n\n{notes}" if notes else ""))
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return results

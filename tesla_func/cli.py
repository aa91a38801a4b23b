"""``tesla-func``: the command line. It only builds configs and calls the library.

    tesla-func data                         # which datasets are available, and where
    tesla-func experts --dataset fashion-mnist --num-experts 5 --epochs 50 --width 128 \\
        --out experts/fmnist                # train (or resume) expert trajectories
    tesla-func distill --experts-dir experts/fmnist --ipc 10 --method exact \\
        --label-strategy sla --out runs/fmnist-ipc10   # distil (or resume) a synthetic set
    tesla-func evaluate --synthetic runs/fmnist-ipc10/synthetic.safetensors --num-models 5
    tesla-func evaluate --random-real 10 --dataset fashion-mnist   # the baseline
    tesla-func show runs/fmnist-ipc10/synthetic.safetensors   # its picture: synthetic.png
    tesla-func export runs/fmnist-ipc10/synthetic.safetensors --out sets/fmnist-ipc10
                                            # the set as an image folder (PNGs + exact floats)
    tesla-func plan --dataset imagenet64 --model convnetd4 --ipc 1 --batch-syn 100 \\
        --syn-steps 50 --device-memory 48GB   # predicted memory and FLOPs of every method

    torchrun --nproc_per_node=2 -m tesla_func.cli distill ...   # the same on 2 processes
    tesla-func distill --config runs/fmnist-ipc10/config.toml --out runs/again   # rerun a run

Every command takes ``--config FILE.toml`` (its options by name; flags given on the command line
win: :mod:`tesla_func.configfile`); ``experts``, ``distill`` and ``evaluate`` take
``--tensorboard DIR`` (:mod:`tesla_func.tracking`).

Under torchrun (its RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the
environment) ``experts``, ``distill`` and ``evaluate`` join one process group: gloo for device cpu,
nccl for cuda (device = LOCAL_RANK), with ``--group-timeout`` seconds for any collective. Experts
and evaluation models are spread over the ranks, the synthetic set is sharded; rank 0 prints and
writes (:mod:`tesla_func.distributed`).

Adding a subcommand: write ``_add_<name>_arguments(parser)`` and ``_run_<name>(args) -> int``
and add one :class:`Command` line to :data:`COMMANDS`. The flags of a command that runs a config
come from the config's fields (:mod:`tesla_func.configargs`), their help from the fields'
comments; booleans are ``--dsa`` / ``--no-dsa``, never ``type=bool``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from tesla_func.augment import DSA
from tesla_func.configargs import add_config_arguments, config_from_args
from tesla_func.configfile import add_config_file_argument, parse_args
from tesla_func.data import (
    ENV_VAR,
    available,
    depth_for,
    load_dataset,
    load_dataset_like,
    run_defaults,
)
from tesla_func.distill import DistillationStopped, DistillConfig, Distiller
from tesla_func.distributed import together, torchrun_group
from tesla_func.evaluate import EvalConfig, evaluate
from tesla_func.experts import ExpertConfig, train_experts
from tesla_func.export import export_set
from tesla_func.models import NORMS
from tesla_func.planner import (
    SWEPT_FIELDS,
    UNPLANNED_FIELDS,
    PlanConfig,
    plan,
    plan_markdown,
    plan_records,
)
from tesla_func.runchecks import RunWarning, check_device
from tesla_func.sampling import per_class_indices
from tesla_func.synthetic import load_synthetic
from tesla_func.tracking import add_tensorboard_argument, tensorboard_logger


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, how it declares its arguments, and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # returns the exit status


# ----------------------------------------------------------------------------------------------
# tesla-func data
# ----------------------------------------------------------------------------------------------


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=None, help="look only in this folder (and ROOT/<name>)")


def _run_data(args: argparse.Namespace) -> int:
    for a in available(args.root):
        if a.found is not None:
            print(f"{a.name:14s} found    {a.found}  ({a.summary})")
        else:
            looked = ", ".join(str(d) for d in a.searched)
            print(f"{a.name:14s} missing  looked in: {looked}\n{'':23s}to get it: {a.how_to_get}")
    print(f"(search order: --root, then ${ENV_VAR} folders, then the user and system folders)")
    return 0


# ----------------------------------------------------------------------------------------------
# torchrun: the commands that run on several processes
# ----------------------------------------------------------------------------------------------


def _add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group-timeout", type=float, default=1800.0, metavar="SECONDS",
                        help="under torchrun: how long any collective (or a rank waiting for "
                             "the others' experts while none makes progress) may wait before it "
                             "fails (default: 1800)")


def _rank(group: object | None) -> int:
    """This process's rank (0 without a process group): rank 0 prints."""
    return 0 if group is None else dist.get_rank(group)


# ----------------------------------------------------------------------------------------------
# tesla-func experts
# ----------------------------------------------------------------------------------------------

def _add_experts_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ExpertConfig)
    parser.add_argument("--out", required=True,
                        help="folder for expert_*.safetensors (an interrupted run resumes)")
    parser.add_argument("--root", default=None, help="folder holding the dataset's files")
    parser.add_argument("--device", default="cpu",
                        help="where the experts train: cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="tqdm progress bars")
    add_tensorboard_argument(parser)
    _add_launch_arguments(parser)


def _run_experts(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, ExpertConfig)
    check_device(args.device)
    with (torchrun_group(args.device, args.group_timeout) as group,
          tensorboard_logger(args.tensorboard, _rank(group)) as logger):
        paths = train_experts(cfg, args.out, root=args.root, device=args.device,
                              progress=args.progress, group=group, wait_s=args.group_timeout,
                              logger=logger)
        if _rank(group) == 0:
            print(f"{len(paths)} experts in {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------
# tesla-func distill / evaluate
# ----------------------------------------------------------------------------------------------


def _add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DistillConfig)
    parser.add_argument("--out", required=True,
                        help="run folder: checkpoint, synthetic.safetensors, log.nc (resumes)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="tqdm progress bar")
    add_tensorboard_argument(parser)
    _add_launch_arguments(parser)


def _run_distill(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, DistillConfig)
    check_device(cfg.device)
    with (torchrun_group(cfg.device, args.group_timeout) as group,
          tensorboard_logger(args.tensorboard, _rank(group)) as logger):
        distiller = Distiller(cfg, args.out, progress=args.progress, group=group, logger=logger)
        synthetic = distiller.run()
        if _rank(group) == 0:
            print(f"synthetic set: {args.out}/synthetic.safetensors ({len(synthetic.images)} "
                  f"images, lr {synthetic.lr:.4g}, {distiller.state.skipped} skipped updates)")
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--synthetic", help="a synthetic.safetensors written by `distill`, or a "
                      "folder written by `export` (or any folder of class folders of PNGs, with "
                      "--dataset)")
    what.add_argument("--random-real", type=_positive_int, metavar="IPC",
                      help="baseline: IPC random real training images per class (needs "
                           "--dataset)")
    parser.add_argument("--dataset", default=None,
                        help="the test set (default: the synthetic set's dataset; required with "
                             "--random-real)")
    parser.add_argument("--root", default=None, help="folder holding the dataset's files")
    add_config_arguments(parser, EvalConfig, skip=("arch_kwargs", "lr", "keep_params"))
    parser.add_argument("--width", type=_positive_int, default=None,
                        help="ConvNet/ResNet width (default: for a ConvNet the synthetic set's "
                             "network, or for random real the dataset's default network, as "
                             "`experts` trains it; else the architecture's)")
    parser.add_argument("--depth", type=_positive_int, default=None,
                        help="ConvNet blocks (default: as for --width)")
    parser.add_argument("--norm", choices=NORMS, default=None,
                        help="ConvNet normalisation (default: the synthetic set's network, "
                             "else instance)")
    parser.add_argument("--lr", type=float, default=None,
                        help="training lr (default: the synthetic set's learned lr, or 0.01 for "
                             "random real)")
    parser.add_argument("--dsa", action=argparse.BooleanOptionalAction, default=True,
                        help="DSA augmentation on every training batch, as distillation and the "
                             "field evaluate (default: on)")
    parser.add_argument("--out", default=None, help="write the accuracies here as netCDF")
    parser.add_argument("--from-pngs", action="store_true",
                        help="with an exported folder: train on its 8-bit PNGs, not on its exact "
                             "float file")
    add_tensorboard_argument(parser)
    _add_launch_arguments(parser)


def _evaluation_set(args: argparse.Namespace):
    """(images, labels, lr, dataset, network): the synthetic set or the random real baseline to
    train on, its default lr, the dataset holding the test set, and the network the set was
    distilled through (its ConvNet's width, depth and norm; none for random real)."""
    if args.synthetic:
        synthetic = load_synthetic(args.synthetic, from_pngs=args.from_pngs,
                                   dataset=args.dataset, root=args.root)
        info = synthetic.header.get("dataset_info") or {}
        name = args.dataset or info.get("name") or synthetic.header["config"]["dataset"]
        if info.get("name") == name:  # the set's own dataset, reloaded as it was and checked
            dataset = load_dataset_like(info, args.root, what=args.synthetic)
        else:
            dataset = load_dataset(name, args.root, zca=bool(info.get("zca", False)))
        arch = synthetic.header.get("architecture") or {}
        network = {k: arch[k] for k in ("width", "depth", "norm") if k in arch}
        return synthetic.images, synthetic.labels, synthetic.lr, dataset, network
    if args.dataset is None:
        raise ValueError("--random-real needs --dataset NAME: the dataset whose training images "
                         "are drawn")
    dataset = load_dataset(args.dataset, args.root)
    index = per_class_indices(dataset.train_labels, args.random_real,
                              torch.Generator().manual_seed(0), dataset.info.num_classes,
                              dataset.info.class_names)
    info = dataset.info  # the network experts of this dataset would train by default
    defaults, _ = run_defaults(info.name, info.channels, info.image_size)
    network = {"width": defaults.width, "depth": depth_for(info.image_size)[0]}
    return dataset.train_images[index], dataset.train_labels[index], 0.01, dataset, network


def _run_evaluate(args: argparse.Namespace) -> int:
    from tesla_func.results import save_results  # where used: xarray and pandas cost 0.6 s

    device = args.device or EvalConfig().device
    check_device(device)
    with (torchrun_group(device, args.group_timeout) as group,
          tensorboard_logger(args.tensorboard, _rank(group)) as logger):
        with together(group):  # a rank that cannot read the set stops every rank
            images, labels, lr, dataset, network = _evaluation_set(args)
        arch = args.arch or EvalConfig().arch
        given = {k: getattr(args, k) for k in ("width", "depth", "norm")
                 if getattr(args, k) is not None}
        # the set's own network for a ConvNet; another architecture takes only what is given
        arch_kwargs = {**network, **given} if arch == "convnet" else given
        cfg = config_from_args(args, EvalConfig,
                               EvalConfig(lr=lr if args.lr is None else args.lr,
                                          arch_kwargs=arch_kwargs))
        result = evaluate(images, labels, dataset.test_images, dataset.test_labels, cfg,
                          DSA() if args.dsa else None, num_classes=dataset.info.num_classes,
                          group=group, logger=logger)
        if _rank(group) != 0:
            return 0
    print(f"test accuracy: {result}")
    if args.out:
        source = args.synthetic or f"random real, ipc {args.random_real}"
        save_results(result.to_xarray(), args.out)
        print(f"wrote {args.out} ({source})")
    return 0


# ----------------------------------------------------------------------------------------------
# tesla-func show
# ----------------------------------------------------------------------------------------------


def _add_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("synthetic",
                        help="a synthetic.safetensors written by `distill` (or a snapshot)")
    parser.add_argument("--out", default=None,
                        help="the PNG to write (default: beside the file, <stem>.png)")
    parser.add_argument("--root", default=None,
                        help="folder holding the set's dataset: read only to undo ZCA "
                             "(default: where the dataset is found; for 'folder', its recorded "
                             "root)")
    parser.add_argument("--max-classes", type=int, default=20,
                        help="draw at most this many classes")
    parser.add_argument("--max-per-class", type=int, default=20,
                        help="draw at most this many images of each class")


def _run_show(args: argparse.Namespace) -> int:
    # where used: seaborn and matplotlib (through plots) cost 1-2 s at start-up, which every
    # command and `tesla-func --help` would pay
    from tesla_func.plots import plot_synthetic

    out = Path(args.out) if args.out else Path(args.synthetic).with_suffix(".png")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the PNG file to write, such as "
                         f"{out / Path(args.synthetic).with_suffix('.png').name}")
    plot_synthetic(args.synthetic, out, root=args.root, max_classes=args.max_classes,
                   max_per_class=args.max_per_class)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------------------
# tesla-func export
# ----------------------------------------------------------------------------------------------


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("synthetic",
                        help="a synthetic.safetensors written by `distill` (or a snapshot)")
    parser.add_argument("--out", required=True,
                        help="the folder to write: <k>_<class>/<i>.png, synthetic.safetensors "
                             "(the exact set) and set.json (replaces an earlier export there)")
    parser.add_argument("--root", default=None,
                        help="folder holding the set's dataset: read only to undo ZCA "
                             "(default: where the dataset is found)")


def _run_export(args: argparse.Namespace) -> int:
    loss = export_set(args.synthetic, args.out, root=args.root)
    print(f"wrote {args.out} (an ImageFolder layout; the exact set in synthetic.safetensors)\n"
          f"{loss}")
    return 0


# ----------------------------------------------------------------------------------------------
# tesla-func plan
# ----------------------------------------------------------------------------------------------


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    # The run's planned fields take distill's own flags (--ipc, --keep-graphs, ...); its swept
    # fields (syn_steps, method) take the plan's, which take several values; the rest none.
    unread = (*UNPLANNED_FIELDS, *SWEPT_FIELDS)
    add_config_arguments(parser, PlanConfig, skip=tuple(f"distill.{f}" for f in unread),
                         flatten=("distill",), aliases={"methods": ("--method",)})
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown",
                        help="a Markdown table (default) or JSON for scripts")


def _run_plan(args: argparse.Namespace) -> int:
    ds = plan(config_from_args(args, PlanConfig))
    print(json.dumps(plan_records(ds), indent=2) if args.format == "json" else plan_markdown(ds))
    return 0


COMMANDS: dict[str, Command] = {
    "data": Command("list the datasets and where their files are", _add_data_arguments, _run_data),
    "experts": Command(
        "train expert trajectories (resumes an interrupted run)",
        _add_experts_arguments,
        _run_experts,
    ),
    "distill": Command("distil a synthetic set by trajectory matching (resumes from --out)",
                       _add_distill_arguments, _run_distill),
    "evaluate": Command("train fresh networks on a synthetic (or random real) set and test them",
                        _add_evaluate_arguments, _run_evaluate),
    "show": Command("draw a synthetic set as pixels, one row per class", _add_show_arguments,
                    _run_show),
    "plan": Command("predict the peak memory and FLOPs of each method, without data or a GPU",
                    _add_plan_arguments, _run_plan),
    "export": Command("write a synthetic set as an image folder (PNGs, exact floats, set.json)",
                      _add_export_arguments, _run_export),
}


def build_parser(commands: dict[str, Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tesla-func", description="Dataset distillation by trajectory matching (MTT / TESLA)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in commands.items():
        command_parser = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(command_parser)
        add_config_file_argument(command_parser)
    return parser


def _show_warning(command: str) -> Callable[..., None]:
    """``warnings.showwarning`` for the command line: a run's warnings as one line each,
    ``tesla-func <command>: warning: ...`` (above any progress bar); others as Python shows
    them."""
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs) -> None:
        if issubclass(category, RunWarning):
            tqdm.write(f"tesla-func {command}: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, *args, **kwargs)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tesla-func``; returns the exit status (errors go to stderr, status 1)."""
    args = parse_args(build_parser(), argv)  # with the options of a --config file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", RunWarning)  # a run warns of each kind once
            warnings.showwarning = _show_warning(args.command)
            return COMMANDS[args.command].run(args)
    except DistillationStopped as err:  # its last good set is written; the message says where
        print(f"tesla-func {args.command}: stopped: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, KeyError, TimeoutError, ImportError) as err:
        message = err.args[0] if err.args else repr(err)
        print(f"tesla-func {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

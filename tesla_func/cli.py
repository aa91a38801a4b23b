"""``tesla-func``: the command line. It only builds configs and calls the library.

    tesla-func data                         # which datasets are available, and where
    tesla-func experts --dataset fashion-mnist --num-experts 5 --epochs 50 --width 128 \\
        --out experts/fmnist                # train (or resume) expert trajectories

Adding a subcommand: write ``_add_<name>_arguments(parser)`` and ``_run_<name>(args) -> int``
and add one :class:`Command` line to :data:`COMMANDS`. Booleans are
``argparse.BooleanOptionalAction`` (``--dsa`` / ``--no-dsa``), never ``type=bool``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tesla_func.data import DATASETS, ENV_VAR, available
from tesla_func.experts import ExpertConfig, train_experts


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
# tesla-func experts
# ----------------------------------------------------------------------------------------------

_EXPERT_DEFAULTS = ExpertConfig()


def _add_experts_arguments(parser: argparse.ArgumentParser) -> None:
    d = _EXPERT_DEFAULTS
    parser.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    parser.add_argument("--root", default=None, help="folder holding the dataset's files")
    parser.add_argument(
        "--zca",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ZCA-whiten the data (default: the dataset's own default)",
    )
    parser.add_argument("--num-experts", type=int, default=d.num_experts)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--width", type=int, default=d.width, help="ConvNet feature maps")
    parser.add_argument("--depth", type=int, default=d.depth, help="ConvNet blocks")
    parser.add_argument("--norm", choices=("instance", "none"), default=d.norm)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--momentum", type=float, default=d.momentum)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument(
        "--dsa",
        action=argparse.BooleanOptionalAction,
        default=d.dsa,
        help="DSA augmentation on every real batch",
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", required=True, help="folder for expert_*.safetensors")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def _run_experts(args: argparse.Namespace) -> int:
    # Every ExpertConfig field has a flag of the same name (--num-experts -> num_experts).
    cfg = ExpertConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ExpertConfig)})
    paths = train_experts(cfg, args.out, root=args.root, device=args.device, progress=args.progress)
    print(f"{len(paths)} experts in {args.out}")
    return 0


COMMANDS: dict[str, Command] = {
    "data": Command("list the datasets and where their files are", _add_data_arguments, _run_data),
    "experts": Command(
        "train expert trajectories (resumes an interrupted run)",
        _add_experts_arguments,
        _run_experts,
    ),
}


def build_parser(commands: dict[str, Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tesla-func", description="Dataset distillation by trajectory matching (MTT / TESLA)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in commands.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tesla-func``; returns the exit status (errors go to stderr, status 1)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        message = err.args[0] if err.args else repr(err)
        print(f"tesla-func {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Released distilled sets: a run's set copied under ``results/sets/``, with its model card line.

    python -m tesla_func.release RUN NAME        # RUN: a distill run folder

:func:`release_set` copies ``RUN/synthetic.safetensors`` byte for byte to
``results/sets/<NAME>.safetensors`` and writes the set's line in ``results/sets/README.md`` (the
sets' model card; a set released again under the same name replaces its line). The line says how
the set was made (dataset, IPC, method and labels, the schedule, the experts' network), the git
revision that made it, and its test accuracy under which protocol; all of it read from the set's
header and the run's ``log.nc`` (its last evaluation). A set whose revision is ``-dirty`` (made
from uncommitted code) is refused unless ``allow_dirty``: a released set must be remade from a
commit. The README's section "Use a distilled set" loads one and trains a network on it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from tesla_func.fileio import atomic_write_bytes, atomic_write_text
from tesla_func.results import load_results
from tesla_func.synthetic import SyntheticSet, load_synthetic

SETS_DIR = Path("results") / "sets"
CARD = "README.md"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_COLUMNS = ("set", "dataset", "IPC", "method, labels", "how made", "revision", "test accuracy",
            "protocol")
_INTRO = """# Distilled sets

Each file is a synthetic set in tesla_func's format, readable with `safetensors` alone:
`images` (N, C, H, W) in the dataset's normalised input space (pixel = image * std + mean per
channel; CIFAR sets are ZCA-whitened too), `labels` (N,) classes or (N, K) probabilities, `lr`
the learned student learning rate to train with, and a JSON header (safetensors metadata key
`header`) with the dataset's `dataset_info` (mean, std, class names), the distillation config
and the provenance. The main README's section "Use a distilled set" loads one and trains a
network on it; `tesla-func export` writes one as an image folder.

One line per set: how it was made, at which revision, and its test accuracy under which
protocol. Written by `python -m tesla_func.release RUN NAME` (`tesla_func.release`).
"""


def _run_files(run: Path) -> tuple[Path, Path | None]:
    """(the set file, the run's log.nc or None) of a run folder or a set file."""
    if run.is_dir():
        return run / "synthetic.safetensors", run / "log.nc"
    log = run.parent / "log.nc"
    return run, log if run.name == "synthetic.safetensors" else None


def _last_accuracy(log: Path | None) -> str | None:
    """'80.6 ± 0.6 %' from the last evaluation in a run's log.nc (None without one)."""
    if log is None or not log.is_file():
        return None
    ds = load_results(log)
    if "eval_accuracy_mean" not in ds or ds.sizes.get("eval_iteration", 0) == 0:
        return None
    mean, std = (float(ds[f"eval_accuracy_{k}"].values[-1]) for k in ("mean", "std"))
    return f"{100 * mean:.1f} ± {100 * std:.1f} %"


def _protocol(synthetic: SyntheticSet) -> str:
    """The distillation's evaluation protocol, from the set's header."""
    cfg, arch = synthetic.header.get("config") or {}, synthetic.header.get("architecture") or {}
    net = (f"ConvNet-{arch.get('depth', '?')} width {arch.get('width', '?')} "
           f"({arch.get('norm', '?')})")
    return (f"{cfg.get('eval_models', '?')} × {net} trained {cfg.get('eval_epochs', '?')} epochs "
            f"on the set at its lr {synthetic.lr:.3g} (SGD momentum 0.9, weight decay 5e-4, "
            f"batch 256, lr × 0.1 at half{', DSA' if cfg.get('dsa') else ''}); mean ± std over "
            "the models on the real test set")


def card_line(name: str, synthetic: SyntheticSet, accuracy: str, protocol: str) -> str:
    """The set's line of the model card (a Markdown table row)."""
    header = synthetic.header
    cfg, arch = header.get("config") or {}, header.get("architecture") or {}
    info = header.get("dataset_info") or {}
    made = (f"{header.get('iteration', cfg.get('iterations', '?'))} iterations of T = "
            f"{cfg.get('syn_steps', '?')} student steps matching M = "
            f"{cfg.get('match_epochs', '?')} expert epochs (start epoch < "
            f"{cfg.get('max_start_epoch', '?')}), experts ConvNet width {arch.get('width', '?')}; "
            f"lr_img {cfg.get('lr_img', '?')}, seed {cfg.get('seed', '?')}, "
            f"{header.get('skipped_updates', 0)} skipped updates")
    revision = (header.get("provenance") or {}).get("git_revision", "unknown")
    cells = (f"`{name}`", str(info.get("name", "?")), str(cfg.get("ipc", "?")),
             f"{cfg.get('method', '?')}, {cfg.get('label_strategy', '?')}", made,
             f"`{revision}`", accuracy, protocol)
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _write_card(card: Path, name: str, line: str) -> None:
    """Put ``line`` in the card's table: in place of ``name``'s line, else at its end."""
    lines = card.read_text().splitlines() if card.is_file() else [
        *_INTRO.splitlines(), "", "| " + " | ".join(_COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS)]
    mine = f"| `{name}` |"
    rows = [i for i, text in enumerate(lines) if text.startswith("| `")]
    same = [i for i in rows if lines[i].startswith(mine)]
    if same:
        lines[same[0]] = line
    else:
        end = (rows[-1] if rows else max(i for i, t in enumerate(lines) if t.startswith("|")))
        lines.insert(end + 1, line)
    atomic_write_text(card, "\n".join(lines) + "\n")


def release_set(
    run: str | Path,
    name: str,
    *,
    sets_dir: str | Path = SETS_DIR,
    accuracy: str | None = None,
    protocol: str | None = None,
    allow_dirty: bool = False,
) -> Path:
    """Copy a run's set to ``sets_dir/<name>.safetensors`` and write its model card line.

    run: a distill run folder (``synthetic.safetensors`` and ``log.nc``) or a set file.
    accuracy, protocol: the card's test accuracy and its protocol, as text; by default the run's
        last evaluation in its ``log.nc`` and the distillation's evaluation protocol (a set file
        without a log beside it needs ``accuracy``).
    allow_dirty: release a set made from uncommitted code (its revision ends in ``-dirty``).

    Returns the released file. Raises ValueError for a bad name, a dirty revision, no accuracy;
    what :func:`~tesla_func.synthetic.load_synthetic` raises for the set.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"set name {name!r}: letters, digits, '.', '_' and '-' only, starting "
                         "with a letter or digit")
    path, log = _run_files(Path(run))
    synthetic = load_synthetic(path)
    revision = (synthetic.header.get("provenance") or {}).get("git_revision", "unknown")
    if not allow_dirty and (revision.endswith("-dirty") or revision == "unknown"):
        raise ValueError(f"{path} was made at revision {revision!r}, not a commit: distil it "
                         "again from a clean checkout (or pass allow_dirty=True)")
    accuracy = accuracy or _last_accuracy(log)
    if accuracy is None:
        raise ValueError(f"no evaluation of {path} found (no log.nc with one beside it): pass "
                         "accuracy= (and protocol=)")
    out = Path(sets_dir) / f"{name}.safetensors"
    atomic_write_bytes(out, path.read_bytes())
    _write_card(Path(sets_dir) / CARD, name,
                card_line(name, synthetic, accuracy, protocol or _protocol(synthetic)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tesla_func.release",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a distill run folder (or its synthetic.safetensors)")
    parser.add_argument("name", help="the released set's name: results/sets/<name>.safetensors")
    parser.add_argument("--sets-dir", default=str(SETS_DIR), help="default: results/sets")
    parser.add_argument("--accuracy", default=None,
                        help="the card's accuracy (default: the run's last evaluation)")
    parser.add_argument("--protocol", default=None,
                        help="the card's protocol (default: the run's evaluation protocol)")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="release a set made from uncommitted code")
    args = parser.parse_args(argv)
    try:
        out = release_set(args.run, args.name, sets_dir=args.sets_dir, accuracy=args.accuracy,
                          protocol=args.protocol, allow_dirty=args.allow_dirty)
    except (FileNotFoundError, ValueError) as err:
        print(f"release: error: {err}", file=sys.stderr)
        return 1
    print(f"released {out}; its line is in {Path(args.sets_dir) / CARD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The synthetic-set file: what a distillation produces and what evaluation trains on.

One safetensors file (:mod:`tesla_func.fileio`; no pickle), ``synthetic.safetensors``:

- ``images``: (N, C, H, W) in the dataset's network input space (normalised, maybe whitened);
- ``labels``: (N,) int64 classes, or (N, K) probabilities (soft and learned strategies);
- ``lr``: () float64, the learned student lr beta, which evaluation trains with;
- ``label_logits``: (N, K) the learned logits (strategies that learn them);
- header (JSON): ``format`` ("tesla_func.synthetic"), the distillation config, the iteration, the
  skipped-update count, ``dataset_info`` (to undo the normalisation), the architecture and
  provenance.

A run with ``DistillConfig.snapshot_every`` also keeps snapshots of its set in this format,
``<run>/snapshots/images_<iteration>.safetensors`` (:func:`snapshot_path`; the header's
``iteration`` says when), so that anything drawing or evaluating a set takes a snapshot too.

A set exported as an image folder (``tesla-func export``, :mod:`tesla_func.export`) keeps this
file beside its PNGs, and :func:`load_synthetic` takes the folder too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tesla_func.fileio import load_tensors, save_tensors

if TYPE_CHECKING:
    from tesla_func.data import Dataset

FORMAT = "tesla_func.synthetic"
SNAPSHOTS = "snapshots"  # the folder of snapshots in a run folder (DistillConfig.snapshot_every)


def snapshot_path(run_dir: str | Path, iteration: int) -> Path:
    """Where the snapshot of the set after ``iteration`` iterations is kept in ``run_dir``."""
    return Path(run_dir) / SNAPSHOTS / f"images_{iteration:06d}.safetensors"


def snapshot_paths(run_dir: str | Path) -> list[Path]:
    """The snapshots kept in ``run_dir``, in iteration order (empty if none)."""
    return sorted((Path(run_dir) / SNAPSHOTS).glob("images_*.safetensors"))


@dataclass(frozen=True, eq=False)
class SyntheticSet:
    """A distilled set: what evaluation trains on."""

    images: Tensor  # (N, C, H, W), in the dataset's normalised (maybe whitened) space
    labels: Tensor  # (N,) int64 classes, or (N, K) probabilities (soft strategies, learned)
    lr: float  # the learned student lr beta: evaluation trains with it
    label_logits: Tensor | None  # (N, K) the learned logits (strategies that learn them)
    header: dict  # config, provenance, skipped-update count, ...

    def save(self, path: str | Path) -> None:
        """Write the set atomically as safetensors with its header."""
        tensors = {
            "images": self.images,
            "labels": self.labels,
            "lr": torch.tensor(self.lr, dtype=torch.float64),
        }
        if self.label_logits is not None:
            tensors["label_logits"] = self.label_logits
        save_tensors(path, tensors, {**self.header, "format": FORMAT})


def load_synthetic(
    path: str | Path,
    *,
    from_pngs: bool = False,
    dataset: Dataset | str | None = None,
    root: str | Path | None = None,
) -> SyntheticSet:
    """Read a set written by :meth:`SyntheticSet.save`, or a folder of class folders of images.

    A folder is read by :func:`tesla_func.export.load_set_folder` with the keywords: one that
    ``tesla-func export`` wrote gives back the exact set from its float file (or, with
    ``from_pngs``, its 8-bit PNGs); any other folder of class folders of PNGs (torchvision's
    ``ImageFolder`` layout) needs the ``dataset`` its images belong to. A file's header names
    its own dataset: ``dataset`` and ``root`` are not read for a file.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file when it is
    truncated, not safetensors, or a tesla_func file of another kind (an expert, a checkpoint).
    """
    if Path(path).is_dir():
        from tesla_func.export import load_set_folder  # (a cycle at import time: it imports this)

        return load_set_folder(path, from_pngs=from_pngs, dataset=dataset, root=root)
    if from_pngs:
        raise ValueError(f"{path} is a file: from_pngs reads the PNGs of a folder that "
                         "`tesla-func export` wrote")
    tensors, header = load_tensors(path)
    if header.get("format") != FORMAT or not {"images", "labels", "lr"} <= set(tensors):
        raise ValueError(
            f"{path} is not a tesla_func synthetic set (format {header.get('format')!r}, "
            f"tensors {sorted(tensors)}); pass the synthetic.safetensors a distillation wrote"
        )
    return SyntheticSet(
        tensors["images"],
        tensors["labels"],
        float(tensors["lr"]),
        tensors.get("label_logits"),
        header,
    )


def class_layout(synthetic: SyntheticSet, where: str) -> tuple[int, int, list[str]]:
    """(K, ipc, class names) of a saved set: its images are class-major, ipc of each class.
    Raises ValueError naming ``where`` when its header has no ``dataset_info`` or its size is not
    a multiple of the classes."""
    info = synthetic.header.get("dataset_info")
    if not isinstance(info, dict) or "num_classes" not in info:
        raise ValueError(f"{where} has no dataset_info in its header: cannot tell its classes")
    k, n = int(info["num_classes"]), len(synthetic.images)
    if n == 0 or n % k:
        raise ValueError(f"{where} holds {n} images, not a multiple of its {k} classes")
    names = [str(c) for c in info.get("class_names") or range(k)]
    return k, n // k, names

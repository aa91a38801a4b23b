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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tesla_func.fileio import load_tensors, save_tensors

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


def load_synthetic(path: str | Path) -> SyntheticSet:
    """Read a set written by :meth:`SyntheticSet.save`.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file when it is
    truncated, not safetensors, or a tesla_func file of another kind (an expert, a checkpoint).
    """
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

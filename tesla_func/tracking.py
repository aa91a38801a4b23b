"""Where a run's numbers go besides its own files: a logger object, and TensorBoard behind it.

The loops never talk to TensorBoard. :class:`~tesla_func.distill.Distiller`,
:func:`~tesla_func.experts.train_experts` and :func:`~tesla_func.evaluate.evaluate` take a
``logger`` (None by default: nothing is logged) with the two methods of :class:`RunLogger`, and
hand it what they already log:

- distillation, every iteration (``distill/``): ``loss``, ``beta``, ``images_grad_norm``,
  ``labels_grad_norm`` (strategies that learn logits), ``lr_grad_norm``, ``skipped`` (this
  iteration) and ``skipped_updates`` (so far), ``label_drift``, ``expert``, ``start_epoch``,
  ``seconds``; every evaluation (``eval/``): ``test_accuracy`` and ``val_accuracy`` with their
  std over the models; every snapshot and the final set: the set's image grid
  (``distill/synthetic_set``, one row per class, drawn as :mod:`tesla_func.plots.sets` draws it);
- experts, every epoch (``experts/expert_<i>/``): ``loss`` (the epoch's last batch, as the
  progress bar shows it) and ``test_accuracy``;
- evaluation, at its end (``evaluate/``): ``test_accuracy`` and ``val_accuracy`` with their std,
  at step = the training epochs.

With several processes only rank 0 logs (the library checks; the command line makes no logger on
the other ranks), so with experts spread over W ranks only rank 0's experts appear.

:class:`TensorBoardLogger` writes them with ``torch.utils.tensorboard.SummaryWriter``; ``tensorboard
--logdir DIR`` shows them, and ``tensorboard.backend.event_processing`` reads them back.
TensorBoard is needed only for this (the extra ``tesla_func[tensorboard]``): it is imported when a
logger is made, never at import time, so the library and its other commands neither need it
installed nor pay its import (protobuf and TensorBoard, about a second).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

INSTALL_HINT = "pip install 'tesla_func[tensorboard]'"


class RunLogger(Protocol):
    """What the loops log to: named scalars at a step, and an image at a step."""

    def scalars(self, group: str, step: int, values: Mapping[str, float]) -> None:
        """``values`` (name -> number) under ``group/`` at ``step``; NaN values are left out."""

    def image(self, tag: str, step: int, pixels: np.ndarray) -> None:
        """One (C, H, W) image, C = 1 or 3, values in [0, 1]."""


class TensorBoardLogger:
    """A :class:`RunLogger` writing TensorBoard event files under ``log_dir``
    (:func:`tensorboard_logger` closes it after a block)."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter  # lazy: see the module docstring
        except ImportError as err:
            raise ImportError(
                f"--tensorboard needs TensorBoard, which is not installed ({err}): "
                f"{INSTALL_HINT}") from err
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def scalars(self, group: str, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            if not math.isnan(value):
                self.writer.add_scalar(f"{group}/{name}", float(value), step)

    def image(self, tag: str, step: int, pixels: np.ndarray) -> None:
        self.writer.add_image(tag, np.asarray(pixels, dtype=np.float32), step, dataformats="CHW")

    def close(self) -> None:
        """Flush and close the event files."""
        self.writer.close()


@contextlib.contextmanager
def tensorboard_logger(log_dir: str | Path | None, rank: int = 0
                       ) -> Iterator[TensorBoardLogger | None]:
    """A :class:`TensorBoardLogger` for the block, closed after it; None when ``log_dir`` is
    None or on a rank other than 0."""
    if log_dir is None or rank != 0:
        yield None
        return
    logger = TensorBoardLogger(log_dir)
    try:
        yield logger
    finally:
        logger.close()


def add_tensorboard_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--tensorboard DIR`` option of the commands that train."""
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="also log the scalars (and for distill the set's image grid) to "
                             f"TensorBoard event files in DIR (needs {INSTALL_HINT})")


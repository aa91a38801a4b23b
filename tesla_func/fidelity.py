"""How far one gradient method is from another, on matching problems drawn like distillation's.

``tesla`` returns a first-order truncation of the MTT gradient and ``exact`` the gradient itself
(proofs/b_two_pass.md, proofs/c_adjoint.md). :func:`agreement` measures the distance between two
:class:`~tesla_func.matching.MatchResult` s (g = dL/dX over all images, d = dL/dbeta)::

    cosine = <g_a, g_b> / (|g_a| |g_b|)        relative error = |g_a - g_b| / |g_b|
    lr relative error = |d_a - d_b| / |d_b|    lr sign agreement = [sign d_a = sign d_b]

and :func:`draw_segment` draws the synthetic side of a problem the way a distillation iteration
does: random real images of every class, non-overlapping minibatches, replayed DSA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tesla_func.augment import DSA, ReplayedDSA
from tesla_func.data import Dataset
from tesla_func.matching import MatchResult
from tesla_func.sampling import draw_minibatches, per_class_indices


def agreement(approx: MatchResult, reference: MatchResult) -> dict[str, float]:
    """How close ``approx``'s gradients are to ``reference``'s (see the module docstring):
    ``images_cosine``, ``images_relative_error``, ``lr_relative_error`` (inf when the
    reference's is 0) and ``lr_sign_agreement`` (1.0 or 0.0)."""
    a, b = approx.images_grad.flatten(), reference.images_grad.flatten()
    da, db = float(approx.beta_grad), float(reference.beta_grad)
    return {
        "images_cosine": float(a @ b / (a.norm() * b.norm())),
        "images_relative_error": float((a - b).norm() / b.norm()),
        "lr_relative_error": abs(da - db) / abs(db) if db else math.inf,
        "lr_sign_agreement": float(math.copysign(1, da) == math.copysign(1, db)),
    }


@dataclass(frozen=True)
class Segment:
    """The synthetic side of a matching problem with up to ``len(batches)`` student steps."""

    images: Tensor  # (N, C, H, W) random real images, ipc per class, class-major
    labels: Tensor  # (N,) their classes
    batches: tuple[Tensor, ...]  # (batch,) index tensors; a T-step problem uses the first T
    augment: ReplayedDSA | None  # DSA parameters of every step, replayed in every pass


def draw_segment(
    dataset: Dataset,
    ipc: int,
    batch: int,
    max_steps: int,
    generator: torch.Generator,
    *,
    dsa: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Segment:
    """Draw images, minibatches and DSA parameters for up to ``max_steps`` steps from
    ``generator`` (in that order), as a distillation iteration would."""
    k = dataset.info.num_classes
    index = per_class_indices(dataset.train_labels, ipc, generator, k, dataset.info.class_names)
    n = len(index)
    if batch > n:
        raise ValueError(f"batch {batch} is larger than the synthetic set (ipc {ipc} x {k} "
                         f"classes = {n} images)")
    batches, _ = draw_minibatches(torch.zeros(0, dtype=torch.long), n, batch, max_steps,
                                  generator)
    augment = (DSA().replayable([batch] * max_steps, generator, device=device, dtype=dtype)
               if dsa else None)
    return Segment(
        dataset.train_images[index].to(device, dtype),
        dataset.train_labels[index].to(device),
        tuple(b.to(device) for b in batches),
        augment,
    )

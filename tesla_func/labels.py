"""Label strategies, registered by name: each one's whole behaviour in one entry.

A strategy says, in one :class:`LabelStrategy`:

- which label logits it starts from (``initial_logits``; only strategies that learn them);
- the teacher checkpoint it reads, if any (``teacher_epoch``: from the iteration's target epoch
  and the expert's last epoch);
- the labels one iteration trains on (``train_labels``), given the image classes, the current
  logits and the teacher's logits on the current images;
- whether the images and/or the label logits are learned;
- the labels saved with the final set, which evaluation trains on (``saved_labels``).

The distillation loop asks the strategy and never compares its name, so a new strategy is one
new entry of :data:`LABEL_STRATEGIES` (``LABEL_STRATEGIES["mine"] = LabelStrategy(...)``): the
config accepts it, the distillation runs it, the tests loop over it.

Soft Label Assignment (SLA, the TESLA paper; docs/reference.md section 4): every iteration the
labels are ``softmax(teacher(X))``, the teacher being the expert at the iteration's *target*
checkpoint theta*_{t+M}, in eval mode, on the un-augmented images, at temperature 1. The matching
call takes label *logits* (its inner loss is the cross-entropy against their softmax), so SLA
hands it the teacher's logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from tesla_func.types import Params


class LabelInputs(NamedTuple):
    """What a strategy may look at when it makes labels."""

    classes: Tensor  # (N,) int64 the class each synthetic image was initialised from
    logits: Tensor | None  # (N, K) the learned label logits, for strategies that learn them
    teacher: Tensor | None  # (N, K) the teacher's logits on the current images, if it has one


@dataclass(frozen=True)
class LabelStrategy:
    """One label strategy (see the module docstring)."""

    description: str
    # the labels the matching call trains on: (N,) int classes, or (N, K) float logits whose
    # softmax is the target
    train_labels: Callable[[LabelInputs], Tensor]
    # what the saved set carries: (N,) classes, or (N, K) probabilities (rows sum to 1)
    saved_labels: Callable[[LabelInputs], Tensor]
    # (target epoch, last epoch of the expert) -> the teacher's checkpoint epoch; None: no teacher
    teacher_epoch: Callable[[int, int], int] | None = None
    # (classes (N,), K, confidence, dtype) -> (N, K) initial logits; None: nothing learned
    initial_logits: Callable[[Tensor, int, float, torch.dtype], Tensor] | None = None
    learns_images: bool = True

    @property
    def learns_logits(self) -> bool:
        return self.initial_logits is not None


def near_one_hot(
    classes: Tensor, num_classes: int, confidence: float, dtype: torch.dtype
) -> Tensor:
    """(N, K) logits whose softmax puts ``confidence`` on the true class, the rest uniform.

    With margin m = log(c (K - 1) / (1 - c)) on the true class and 0 elsewhere,
    softmax = e^m / (e^m + K - 1) = c.
    """
    margin = math.log(confidence * (num_classes - 1) / (1 - confidence))
    return margin * F.one_hot(classes, num_classes).to(dtype)


def teacher_logits(model: nn.Module, params: Params, images: Tensor) -> Tensor:
    """(N, K) logits of the teacher ``params`` on un-augmented ``images`` (N, C, H, W), in eval
    mode, without a graph. The module's own mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return functional_call(model, params, (images,), strict=True)
    finally:
        model.train(was_training)


def label_drift(labels: Tensor, classes: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """How far labels have drifted from the classes the images started in.

    labels: (N,) int classes, or (N, K) logits or probabilities (the teacher's class is the
    argmax; ties go to the lower class); classes: (N,) int64 the initial classes.
    Returns (() float64 fraction of the N images whose teacher class is not their initial class,
    (K,) float64 images per teacher class, summing to N). Hard labels drift 0 by construction.
    """
    teacher = labels if labels.dim() == 1 else labels.argmax(dim=1)  # (N,)
    drift = (teacher != classes).to(torch.float64).mean()
    counts = torch.bincount(teacher.cpu(), minlength=num_classes).to(torch.float64)
    return drift, counts


def _softmax_of(name: str) -> Callable[[LabelInputs], Tensor]:
    return lambda inputs: F.softmax(getattr(inputs, name), dim=-1)


def _soft_label_assignment(
    description: str, teacher_epoch: Callable[[int, int], int], learns_images: bool = True
) -> LabelStrategy:
    """SLA with the teacher at ``teacher_epoch``: the teacher's logits are trained on (the
    matching call takes logits), their softmax is saved."""
    return LabelStrategy(
        description,
        train_labels=lambda inputs: inputs.teacher,
        saved_labels=_softmax_of("teacher"),
        teacher_epoch=teacher_epoch,
        learns_images=learns_images,
    )


def _at_target(target_epoch: int, last_epoch: int) -> int:
    return target_epoch


def _at_last(target_epoch: int, last_epoch: int) -> int:
    return last_epoch


LABEL_STRATEGIES: dict[str, LabelStrategy] = {
    "hard": LabelStrategy(
        "class indices; cross-entropy against one-hot",
        train_labels=lambda inputs: inputs.classes,
        saved_labels=lambda inputs: inputs.classes,
    ),
    "sla": _soft_label_assignment(
        "Soft Label Assignment: softmax(teacher(X)), teacher = the expert at the target epoch",
        teacher_epoch=_at_target,
    ),
    "sla-last": _soft_label_assignment(
        "SLA with the teacher at the expert's last epoch", teacher_epoch=_at_last
    ),
    "learned": LabelStrategy(
        "label logits Y initialised near one-hot, learned with their own lr",
        train_labels=lambda inputs: inputs.logits,
        saved_labels=_softmax_of("logits"),
        initial_logits=near_one_hot,
    ),
    "sla-only": _soft_label_assignment(
        "SLA labels on frozen real images: only beta is learned",
        teacher_epoch=_at_target,
        learns_images=False,
    ),
}
"""Registry of label strategies by name; the distillation and its tests loop over it."""

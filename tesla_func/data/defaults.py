"""What a run on a dataset starts from when the user does not say: one :class:`RunDefaults` per
dataset (held by its registry row), the rules that follow from the image size, and how a config
takes them.

The fields of :class:`~tesla_func.experts.ExpertConfig` and
:class:`~tesla_func.distill_config.DistillConfig` that depend on the dataset default to ``None``,
"the dataset's default". They are *resolved* once the dataset is known (the experts: when the
dataset is loaded; a distillation: when its experts and their dataset are), by
:func:`resolve`: a value given explicitly is kept, a ``None`` takes the default, and the resolved
config is what the run saves, together with a record of each choice and why
(``{"depth": "2: 8x8 images: ..."}``). The command line, the library and the experiment scripts
read the same numbers, from here.

Two things follow from the image size alone, the same for every dataset:

- **ConvNet depth** (:func:`depth_for`): the field's 3 blocks up to 32 px and one more per
  doubling (4 at 64 px), but no more blocks than leave the last block's instance norm at least
  4x4 values: a norm over 2x2 values (8x8 digits at depth 3) normalises almost everything away,
  and such experts stayed near chance (12.8% after 40 epochs; depth 2: 85-95%).
- **Image lr** (:func:`lr_img_for`): one per pixel of an image (C x S x S). The field's image
  lrs grow with the image about so: 1e4 at 3x64x64 (TESLA, ImageNet-1K), 1e5 at 3x128x128 (MTT,
  ImageNet subsets), 100-1000 at 3x32x32 (CIFAR, ZCA-whitened: the CIFAR rows keep the field's
  1000). Measured here: on digits (64) lr_img 10 to 100 distilled IPC 1 sets of 93-94% and 1000
  one of 60% (1000 took the images' norm from 8 to 107); on Fashion-MNIST (784) 1000 did better
  than 250 at IPC 1 (69.3 against 65.7%) and IPC 10 (77.6 against 76.7%).

And one from the experts: **T**, the student steps of an iteration, is no longer than the SGD steps
that the matched ``match_epochs`` of an expert took (:func:`expert_steps`): a student that takes
more steps than its expert overshoots the target (digits, T = 20 against 10 expert steps: loss 9.25
at the first iteration).

A "folder" of your own images takes the defaults of the built-in dataset whose images are closest
to its own in pixels (:func:`run_defaults`), with the depth (and, unless that dataset sets its
own, the image lr) from its own size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

Config = TypeVar("Config")


@dataclass(frozen=True)
class RunDefaults:
    """A dataset's defaults for the fields of ExpertConfig and DistillConfig that depend on it
    (each ``None`` there); ``why`` says where the numbers come from, for the saved record."""

    width: int  # ConvNet feature maps (experts, students and evaluation models)
    num_experts: int  # expert trajectories trained
    expert_epochs: int  # epochs of each expert
    expert_lr: float  # the experts' SGD lr (and beta0, the student's initial lr)
    max_start_epoch: int  # start epochs drawn from 0 .. max_start_epoch - 1
    syn_steps: int  # T, before the cap by the expert steps that match_epochs spans
    iterations: int  # image updates of a distillation
    why: str  # where these numbers come from
    lr_img: float | None = None  # the images' SGD lr; None: one per pixel (lr_img_for)
    # synthetic images per student step, capped at the set (batch_syn_for); None: the whole set
    batch_syn: int | None = None

    def __post_init__(self) -> None:
        for name in ("width", "num_experts", "expert_epochs", "max_start_epoch", "syn_steps",
                     "iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"RunDefaults.{name} must be >= 1, got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------
# The rules of the image size


FIELD_DEPTH, FIELD_SIDE = 3, 32  # the field's ConvNet-3 at 32x32 (one more block per doubling)
MIN_NORM_SIDE = 4  # the last block's instance norm sees at least this many values a side
LR_IMG_PER_PIXEL = 1.0  # the image lr per pixel of an image


def depth_for(image_size: int) -> tuple[int, str]:
    """(ConvNet depth, why) for S x S images: ``max(3, round(log2(S / 4)))`` blocks (3 up to
    32 px, 4 at 64, 5 at 128), capped so that the last block's norm sees at least 4x4 values
    (``S // 2**(depth - 1) >= 4``: 2 blocks for 8x8 images), and at least 1."""
    field = max(FIELD_DEPTH, round(math.log2(max(image_size, 1) / MIN_NORM_SIDE)))
    fits = 1
    while image_size // 2 ** fits >= MIN_NORM_SIDE:  # one more block still leaves >= 4x4
        fits += 1
    depth = max(1, min(field, fits))
    if depth < field:
        side = image_size // 2 ** (depth - 1)
        return depth, (f"{image_size}x{image_size} images: the last block's norm sees "
                       f"{side}x{side} values (one more block: fewer than "
                       f"{MIN_NORM_SIDE}x{MIN_NORM_SIDE})")
    return depth, (f"{image_size}x{image_size} images: the field's depth "
                   f"({FIELD_DEPTH} up to {FIELD_SIDE} px, one more block per doubling)")


def lr_img_for(channels: int, image_size: int) -> tuple[float, str]:
    """(image lr, why): one per pixel of a C x S x S image, to two significant digits."""
    value = float(f"{LR_IMG_PER_PIXEL * channels * image_size ** 2:.2g}")
    return value, f"{channels}x{image_size}x{image_size} images: one per pixel"


def batch_syn_for(defaults: RunDefaults, num_images: int) -> int | None:
    """The student's minibatch for a set of ``num_images``: the dataset's ``batch_syn`` capped at
    the set, or None (the whole set) for a dataset without one."""
    return None if defaults.batch_syn is None else min(defaults.batch_syn, num_images)


def expert_steps(match_epochs: int, train_size: int, batch_size: int) -> int:
    """The SGD steps an expert took in ``match_epochs`` epochs of ``train_size`` images in
    batches of ``batch_size`` (the last batch of an epoch may be smaller)."""
    return match_epochs * math.ceil(train_size / batch_size)


# ----------------------------------------------------------------------------------------------
# Configs take them


Choice = tuple[Any, str]  # (value, why)


def resolve(cfg: Config, choices: Mapping[str, Choice],
            record: Mapping[str, str] | None = None) -> tuple[Config, dict[str, str]]:
    """``cfg`` with every field of ``choices`` that is None set to the chosen value, and the
    record of what was chosen: ``{field: "<value>: <why>"}`` (added to ``record``, if given).
    A field given explicitly is kept and not recorded."""
    chosen = {name: value for name, (value, _) in choices.items() if getattr(cfg, name) is None}
    out = dict(record or {})
    out.update({name: f"{value}: {choices[name][1]}" for name, value in chosen.items()})
    return dataclasses.replace(cfg, **chosen), out

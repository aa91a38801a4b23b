"""What a dataset is, at each stage: as a reader returns it, as the registry knows it, as loaded.

``RawArrays``
    a reader's output: uint8 images ``(N, C, H, W)`` and int64 labels of both splits, with the
    class names and the pixel value that means white. Every reader module returns one.
``DatasetShape``
    what a registered dataset looks like, known without reading its files (the memory planner
    reads none).
``DatasetInfo``
    what a loaded dataset is: enough to rebuild the network and to undo the normalisation. Expert
    and synthetic-set files record it as their ``dataset_info``.
``Dataset``
    a loaded dataset: normalised (and maybe whitened) tensors of train, validation and test, and
    what it takes to turn network inputs back into pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from tesla_func.models import ConvNetConfig

if TYPE_CHECKING:  # an annotation only: kornia costs 0.3 s at start-up (`tesla-func --help`)
    from kornia.enhance import ZCAWhitening


@dataclass(frozen=True)
class RawArrays:
    """What a reader returns: uint8 images (N, C, H, W) and int64 labels, before normalisation."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple[str, ...]
    max_value: float = 255.0  # pixel value that maps to 1.0


def check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    """Raise ValueError naming ``where`` unless every label of ``y`` is in [0, num_classes)."""
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{where}: labels outside [0, {num_classes}): {y.min()}..{y.max()}")


@dataclass(frozen=True)
class DatasetShape:
    """What a registered dataset looks like, known without reading its files (the memory
    planner needs no data)."""

    channels: int  # C
    image_size: int  # H = W, pixels
    num_classes: int  # K
    train_size: int  # images in the training files (validation split included)


@dataclass(frozen=True)
class DatasetInfo:
    """What a loaded dataset is: enough to rebuild the network and to undo the normalisation."""

    name: str
    num_classes: int  # K
    channels: int  # C
    image_size: int  # H = W, pixels
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of pixels in [0, 1]
    std: tuple[float, ...]  # per channel
    zca: bool  # images are ZCA-whitened after the mean/std normalisation
    zca_eps: float | None  # kornia ZCAWhitening eps, None without ZCA
    source: str  # where the files were read ("scikit-learn" for digits)
    # training images per class held out as the validation split (never trained on)
    val_per_class: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def convnet_config(self, **overrides) -> ConvNetConfig:
        """A ConvNetConfig fitting this dataset's images and classes; other fields overridable."""
        return ConvNetConfig(
            **{
                "channels": self.channels,
                "num_classes": self.num_classes,
                "image_size": self.image_size,
                **overrides,
            }
        )


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset: normalised (and maybe whitened) tensors plus what it takes to undo that."""

    info: DatasetInfo
    train_images: Tensor  # (N_train, C, H, W) float32
    train_labels: Tensor  # (N_train,) int64 in [0, K)
    test_images: Tensor  # (N_test, C, H, W) float32, same transform as train
    test_labels: Tensor  # (N_test,) int64
    whitening: ZCAWhitening | None = None  # fitted on the normalised train images when info.zca
    # the validation split: info.val_per_class images of every class, held out of train_*
    val_images: Tensor | None = None  # (N_val, C, H, W) float32, same transform as train
    val_labels: Tensor | None = None  # (N_val,) int64

    def from_pixels(self, pixels: Tensor) -> Tensor:
        """(B, C, H, W) pixels in [0, 1] -> the network's input space (normalised, whitened)."""
        mean, std = channel_stats(self.info, pixels)
        x = (pixels - mean) / std
        return self.whitening(x) if self.whitening is not None else x

    def to_pixels(self, images: Tensor) -> Tensor:
        """Inverse of :meth:`from_pixels`: (B, C, H, W) network inputs -> pixels (about [0, 1])."""
        x = self.whitening.inverse_transform(images) if self.whitening is not None else images
        mean, std = channel_stats(self.info, x)
        return x * std + mean


def channel_stats(info: DatasetInfo, like: Tensor) -> tuple[Tensor, Tensor]:
    """``info``'s mean and std as (1, C, 1, 1) tensors of ``like``'s dtype and device."""
    shape = (1, info.channels, 1, 1)
    mean = torch.tensor(info.mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(info.std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std

"""Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017): the official .npz batches.

Train: ``train_data_batch_<k>.npz``, read in the order of k, from the folder itself or its
``Imagenet64_train_npz/`` or ``Imagenet64_train/``. Test: the official validation set
``val_data.npz``, in the folder or its ``Imagenet64_val_npz/`` or ``Imagenet64_val/``. Each file
holds ``data``, uint8 (N, 3 * 64 * 64), rows laid out like CIFAR's (red plane, green, blue), and
``labels`` numbered 1..1000 (read as 0..999). The files carry no class names. Read with
``allow_pickle=False``.

The reader interface (:mod:`tesla_func.data`): :func:`find` and :func:`read`.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from tesla_func.data.types import RawArrays, check_labels

_IMAGENET64_TRAIN = re.compile(r"train_data_batch_(\d+)\.npz$")


def find(folder: Path) -> Path | None:
    """``folder`` if it (or one of its official sub-folders) holds a train batch, else None."""
    for candidate in (folder, folder / "Imagenet64_train_npz", folder / "Imagenet64_train"):
        if candidate.is_dir() and any(
            _IMAGENET64_TRAIN.search(p.name) for p in candidate.iterdir()
        ):
            return folder
    return None


def _read_npz(path: Path, side: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            x, y = npz["data"], npz["labels"]
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError, zlib.error) as err:
        raise ValueError(
            f"{path} is truncated or not a downsampled-ImageNet batch ({err})"
        ) from err
    y = np.asarray(y, dtype=np.int64) - 1  # the files number classes 1..1000
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * side * side or len(x) != len(y):
        raise ValueError(f"{path}: expected uint8 data (N, {3 * side * side}) and N labels")
    check_labels(y, 1000, str(path))
    return x.reshape(-1, 3, side, side), y  # rows are R plane, G plane, B plane like CIFAR


def read(folder: Path) -> RawArrays:
    """Every train batch and ``val_data.npz`` under ``folder`` -> (N, 3, 64, 64) images, labels."""
    train_files = sorted(
        (
            p
            for sub in (folder, folder / "Imagenet64_train_npz", folder / "Imagenet64_train")
            if sub.is_dir()
            for p in sub.iterdir()
            if _IMAGENET64_TRAIN.search(p.name)
        ),
        key=lambda p: int(_IMAGENET64_TRAIN.search(p.name).group(1)),
    )
    val = next(
        (
            p
            for p in (
                folder / "val_data.npz",
                folder / "Imagenet64_val_npz" / "val_data.npz",
                folder / "Imagenet64_val" / "val_data.npz",
            )
            if p.is_file()
        ),
        None,
    )
    if val is None:
        raise FileNotFoundError(f"downsampled ImageNet val_data.npz is missing under {folder}")
    train = [_read_npz(p, 64) for p in train_files]
    test_x, test_y = _read_npz(val, 64)
    return RawArrays(
        train_x=np.concatenate([x for x, _ in train]),
        train_y=np.concatenate([y for _, y in train]),
        test_x=test_x,
        test_y=test_y,
        class_names=tuple(f"class {i}" for i in range(1000)),  # the files carry no names
    )

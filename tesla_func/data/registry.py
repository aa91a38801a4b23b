"""The table of datasets, one :class:`DatasetSpec` row each, and where their files are found.

A row says what a dataset is (name, shape, classes), where to look and how to get it, which
reader reads it, and how :func:`tesla_func.data.load.load_dataset` prepares it (mean/std, ZCA
default, validation size). The readers are the format modules of this package; the search order
is the package docstring's (:mod:`tesla_func.data`) and :func:`search_dirs`'.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tesla_func.data import cifar, digits, idx, image_folder, imagenet64
from tesla_func.data.defaults import RunDefaults
from tesla_func.data.types import DatasetShape, RawArrays

ENV_VAR = "TESLA_FUNC_DATA"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """One registry row: what a dataset is, where its files are, how to read and prepare it.

    Keyword-only, so that a new field with a default is one new line here and one argument in the
    rows that differ from it.
    """

    # What it is
    name: str  # the name load_dataset and --dataset take
    summary: str  # for `tesla-func data`
    shape: DatasetShape | None  # None: only known once the files are read ("folder")

    # Where its files are, and how they are read
    find: Callable[[Path], Path | None]  # folder -> the file/folder to read, or None
    read: Callable[..., RawArrays]  # (found path, **the read_options below) -> RawArrays
    how_to_get: str  # what to do when the files are missing
    system_dirs: tuple[Path, ...] = ()  # looked in last: where a system package installs it
    # the package that brings the images along, for a dataset with no files to find (digits)
    bundled_with: str | None = None
    root_only: bool = False  # read only from root= (no env var, user or system folders)
    read_options: tuple[str, ...] = ()  # keyword arguments of load_dataset passed on to read
    # called instead of the generic "not found" error, to raise one that says what is wrong
    explain_missing: Callable[[Path | None], None] | None = None

    # How load_dataset prepares it
    mean: tuple[float, ...] | None  # per channel of pixels in [0, 1]; None: the train images'
    std: tuple[float, ...] | None
    zca_default: bool  # whiten when load_dataset is not told (zca=None)
    # images per class held out of the training files as the validation split; None: one
    # sixth of the smallest class (at least 1)
    val_per_class: int | None

    # What a run on it starts from where the user does not say (tesla_func.data.defaults);
    # None ("folder"): those of the dataset whose images are closest in size (run_defaults)
    defaults: RunDefaults | None


_ENV_HINT = f"or pass root=DIR (--root DIR) or set {ENV_VAR}=DIR"
# The field's defaults for the datasets a 2-core CPU cannot distil in reasonable time (MTT and
# TESLA use ConvNet width 128, expert lr 0.01, 50-epoch experts, T 20-50, max start epoch 2-40;
# docs/reference.md section 4); not measured here: there is no GPU and no CIFAR or ImageNet.
_FIELD = RunDefaults(width=128, num_experts=20, expert_epochs=50, expert_lr=0.01,
                     max_start_epoch=20, syn_steps=30, iterations=5000,
                     why="the field's settings (MTT / TESLA, for a GPU)")
_FIELD_ZCA = dataclasses.replace(_FIELD, lr_img=1000.0,
                                 why="the field's settings for ZCA-whitened CIFAR (for a GPU)")
_SPECS: dict[str, DatasetSpec] = {
    row.name: row
    for row in (
        DatasetSpec(
            name="fashion-mnist",
            summary="55000 train + 5000 validation / 10000 test, 28x28x1, 10 classes",
            shape=DatasetShape(1, 28, 10, 60_000),
            find=idx.find,
            read=idx.read,
            how_to_get="install it with `apt-get install dataset-fashion-mnist` (as root), "
            f"{_ENV_HINT} holding the four *-ubyte.gz files",
            system_dirs=(FASHION_MNIST_DIR,),
            mean=(0.2860,),
            std=(0.3530,),  # DC-bench's values
            zca_default=False,
            val_per_class=500,
            # width 32 (the project's reduced CPU protocol): an expert epoch of 55,000 images
            # takes 30 s on one thread of this 2-core CPU (width 128: 170 s), so 3 experts of 6
            # epochs about 9 minutes. T 60 on minibatches of 20 (the main table's): IPC 10 82.2%
            # against 77.6% for T 20 on the whole set, in 100 iterations of 2-4 s each.
            defaults=RunDefaults(
                width=32, num_experts=3, expert_epochs=6, expert_lr=0.01, max_start_epoch=4,
                syn_steps=60, batch_syn=20, iterations=100,
                why="measured on Fashion-MNIST here (width 32 for a CPU)",
            ),
        ),
        DatasetSpec(
            name="digits",
            summary="1238 train + 200 validation / 359 test, 8x8x1, 10 classes",
            shape=DatasetShape(1, 8, 10, 1_438),
            find=digits.find,
            read=digits.read,
            how_to_get="install scikit-learn",
            bundled_with="scikit-learn",
            mean=None,
            std=None,
            zca_default=False,
            val_per_class=20,
            # 5 steps an epoch (1238 images in batches of 256): 5 experts of 10 epochs take
            # 5 s on one thread, 100 iterations at IPC 1 about 10 s
            defaults=RunDefaults(
                width=32, num_experts=5, expert_epochs=10, expert_lr=0.01, max_start_epoch=4,
                syn_steps=20, iterations=100, why="measured on digits here",
            ),
        ),
        DatasetSpec(
            name="cifar10",
            summary="45000 train + 5000 validation / 10000 test, 32x32x3, 10 classes",
            shape=DatasetShape(3, 32, 10, 50_000),
            find=partial(cifar.find, cifar.CIFAR10),
            read=partial(cifar.read, cifar.CIFAR10),
            how_to_get=f"download {cifar.CIFAR10.url} (the python version), {_ENV_HINT} "
            "holding it or its unpacked cifar-10-batches-py/",
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2023, 0.1994, 0.2010),  # MTT's values
            zca_default=True,
            val_per_class=500,
            defaults=_FIELD_ZCA,
        ),
        DatasetSpec(
            name="cifar100",
            summary="45000 train + 5000 validation / 10000 test, 32x32x3, 100 classes",
            shape=DatasetShape(3, 32, 100, 50_000),
            find=partial(cifar.find, cifar.CIFAR100),
            read=partial(cifar.read, cifar.CIFAR100),
            how_to_get=f"download {cifar.CIFAR100.url} (the python version), {_ENV_HINT} "
            "holding it or its unpacked cifar-100-python/",
            mean=(0.5071, 0.4866, 0.4409),
            std=(0.2673, 0.2564, 0.2762),  # MTT's values
            zca_default=True,
            val_per_class=50,
            defaults=_FIELD_ZCA,
        ),
        DatasetSpec(
            name="imagenet64",
            summary="1271167 train + 10000 validation / 50000 test (the official val), 64x64x3, "
            "1000 classes (~63 GB as float32)",
            shape=DatasetShape(3, 64, 1000, 1_281_167),
            find=imagenet64.find,
            read=imagenet64.read,
            how_to_get="download Imagenet64_train_npz and Imagenet64_val_npz from "
            f"https://image-net.org/download-images (downsampled, npz), {_ENV_HINT} holding them",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),  # the usual ImageNet values
            zca_default=False,
            val_per_class=10,
            defaults=_FIELD,
        ),
        DatasetSpec(
            name="folder",
            summary="your own PNG/JPEG images, one sub-folder per class (or train/ and test/)",
            shape=None,
            find=image_folder.find,
            read=image_folder.read,
            how_to_get=f"pass root=DIR (--root DIR), a folder holding {image_folder.LAYOUT}",
            root_only=True,
            read_options=("image_size",),
            explain_missing=image_folder.explain_missing,
            mean=None,
            std=None,
            zca_default=False,
            val_per_class=None,
            defaults=None,
        ),
    )
}
DATASETS: tuple[str, ...] = tuple(_SPECS)


def spec(name: str) -> DatasetSpec:
    """The registry row of ``name``; KeyError (listing the known names) for an unknown one."""
    if name not in _SPECS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return _SPECS[name]


def shape(name: str) -> DatasetShape:
    """Channels, image side, classes and training-set size of a registered dataset, no files read.

    Raises KeyError for an unknown name or a dataset whose shape only its files tell ("folder";
    the messages list the known names).
    """
    row = spec(name)
    if row.shape is None:
        fixed = [n for n, s in _SPECS.items() if s.shape is not None]
        raise KeyError(f"dataset {name!r} has no fixed shape (it is known once its files are "
                       f"read); datasets with one: {', '.join(fixed)}")
    return row.shape


def run_defaults(name: str, channels: int, image_size: int) -> tuple[RunDefaults, str]:
    """(The defaults of dataset ``name``, their source) for its C x S x S images: the row's
    own, or for a row without ("folder", or a dataset made in memory and in no row) those of
    the dataset whose images are closest in pixels (on a log scale)."""
    row = _SPECS.get(name)
    if row is not None and row.defaults is not None:
        return row.defaults, row.defaults.why
    pixels = channels * image_size ** 2
    like = min((r for r in _SPECS.values() if r.defaults is not None and r.shape is not None),
               key=lambda r: abs(math.log(r.shape.channels * r.shape.image_size ** 2 / pixels)))
    return like.defaults, (f"{like.defaults.why}: those of {like.name!r}, whose images are "
                           f"closest to {channels}x{image_size}x{image_size}")


def dataset_options(name: str) -> tuple[str, ...]:
    """The keyword options of :func:`~tesla_func.data.load.load_dataset` that dataset ``name``
    takes (``("image_size",)`` for "folder", none for the named datasets). Raises KeyError for an
    unknown name."""
    return spec(name).read_options


def search_dirs(name: str, root: str | Path | None = None) -> list[Path]:
    """The folders looked in for ``name``, in order (the search order of :mod:`tesla_func.data`)."""
    row = spec(name)
    if row.root_only:
        return [] if root is None else [Path(root)]
    if root is not None:
        return [Path(root), Path(root) / name]
    dirs = []
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry:
            dirs += [Path(entry) / name, Path(entry)]
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return dirs + [data_home / "tesla_func" / name, *row.system_dirs]


@dataclass(frozen=True)
class Availability:
    """Whether a dataset's files were found (for ``tesla-func data``)."""

    name: str
    summary: str
    found: Path | None  # the file or folder that would be read; None if missing
    searched: tuple[Path, ...]
    how_to_get: str


def locate(name: str, root: str | Path | None = None) -> Availability:
    """Find ``name``'s files without reading them."""
    row = spec(name)
    searched = tuple(search_dirs(name, root))
    if row.bundled_with is not None:
        return Availability(name, row.summary, Path(row.bundled_with), (), row.how_to_get)
    found = next((hit for d in searched if d.is_dir() and (hit := row.find(d)) is not None), None)
    return Availability(name, row.summary, found, searched, row.how_to_get)


def available(root: str | Path | None = None) -> list[Availability]:
    """:func:`locate` for every registered dataset."""
    return [locate(name, root) for name in DATASETS]

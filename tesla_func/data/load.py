"""Loading a registered dataset, and reloading the one a file recorded.

:func:`load_dataset` reads a dataset's files with its registry row's reader
(:mod:`tesla_func.data.registry`) and prepares them, the same way for every dataset:

1. **Validation split.** ``val_per_class`` training images of every class are held out
   (:func:`validation_indices`: a fixed draw from ``seeded_generator(VALIDATION_SEED)``, so the
   split depends on the labels only, never on a run's seed), before anything else sees them.
2. **Normalisation.** Pixels are scaled to [0, 1], then normalised per channel by the row's fixed
   mean/std, or by the train images' own where the row has none (digits, folder).
3. **ZCA.** Where asked (by default for CIFAR), kornia's ``ZCAWhitening(eps=ZCA_EPS)`` is fitted
   on the normalised train images and applied to train, validation and test (:func:`fit_zca`).

Expert and synthetic-set files record their dataset as a ``dataset_info`` dict (a
:class:`~tesla_func.data.types.DatasetInfo`): :func:`load_dataset_like` reloads it and
:func:`check_same_dataset` checks it is the same; :func:`pixels_from_info` turns a set's images
back into pixels with it, and :func:`inputs_from_info` pixels into a set's images.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from tesla_func.data.registry import DATASETS, DatasetSpec, locate, spec
from tesla_func.data.types import Dataset, DatasetInfo, channel_stats
from tesla_func.sampling import per_class_indices, seeded_generator

if TYPE_CHECKING:  # kornia is imported where used (fit_zca): 0.3 s that `--help` need not pay
    from kornia.enhance import ZCAWhitening

ZCA_EPS = 0.1  # docs/reference.md section 3: kornia ZCAWhitening(eps=0.1), as MTT and TESLA use


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    zca: bool | None = None,
    image_size: int | None = None,
    val_per_class: int | None = None,
) -> Dataset:
    """Load a registered dataset: normalised float32 images, int64 labels and its metadata.

    Args:
        name: one of :data:`DATASETS`.
        root: folder holding the files; when given, the only place looked in ("folder": the
            only place ever looked in).
        zca: whiten with kornia ``ZCAWhitening(eps=0.1)`` fitted on the normalised train images
            and applied to both splits; ``None`` takes the dataset's default (on for CIFAR).
        image_size: "folder" only: resize every image to this side S (bilinear, antialiased);
            ``None`` keeps the images' own size, which must then be one square size for all.
        val_per_class: training images of every class held out as the validation split
            (:func:`validation_indices`); ``None`` takes the dataset's documented number (500 per
            class for Fashion-MNIST and CIFAR-10, 50 for CIFAR-100, 10 for ImageNet64, 20 for
            digits, a sixth of the smallest class for "folder"); 0 holds out nothing.

    Raises:
        KeyError: unknown name (the message lists the known ones).
        FileNotFoundError: files missing (says where it looked and how to get them).
        ValueError: a truncated or corrupt file (names it); fewer than 2 classes; for "folder"
            also an empty class, a class missing from test/, grey and colour images mixed, sizes
            that differ without ``image_size`` (each names the class or files).
    """
    row = spec(name)
    options = {"image_size": image_size}
    for option, value in options.items():
        if value is not None and option not in row.read_options:
            raise ValueError(f"{option}= is not an option of dataset {name!r}")
    where = locate(name, root)
    if where.found is None:
        if row.explain_missing is not None:
            row.explain_missing(None if root is None else Path(root))
        looked = ", ".join(str(d) for d in where.searched) or "(nowhere)"
        raise FileNotFoundError(
            f"dataset {name!r} not found; looked in: {looked}. To get it: {row.how_to_get}."
        )
    raw = row.read(where.found, **{option: options[option] for option in row.read_options})
    if len(raw.class_names) < 2:
        raise ValueError(f"dataset {name!r} from {where.found} has {len(raw.class_names)} class "
                         f"({', '.join(raw.class_names)}): a classifier needs at least 2; add a "
                         "folder of images for each other class")
    train_y = torch.from_numpy(np.ascontiguousarray(raw.train_y)).long()
    per_class = _validation_size(row, train_y, raw.class_names, where.found, val_per_class)
    val_index = validation_indices(train_y, per_class, len(raw.class_names))
    train_x, val_x = raw.train_x, raw.train_x[:0]
    if per_class:  # split the uint8 arrays, before they become 4x larger floats
        keep = np.ones(len(train_y), dtype=bool)
        keep[val_index.numpy()] = False
        train_x, val_x = train_x[keep], train_x[val_index.numpy()]
        val_y, train_y = train_y[val_index], train_y[torch.from_numpy(keep)]
    else:
        val_y = train_y[:0]
    # (the arrays' own strides are kept: for one channel, torch may then pick channels-last
    # convolution kernels, and another layout changes the last bits of what is trained on them)
    train_x = torch.from_numpy(np.ascontiguousarray(train_x)).float().div_(raw.max_value)
    val_x = torch.from_numpy(np.ascontiguousarray(val_x)).float().div_(raw.max_value)
    test_x = torch.from_numpy(np.ascontiguousarray(raw.test_x)).float().div_(raw.max_value)
    if row.mean is None:  # digits, folder: the train set's own statistics
        mean = tuple(train_x.mean(dim=(0, 2, 3)).tolist())
        std = tuple(train_x.std(dim=(0, 2, 3)).tolist())
        if not all(s > 0 for s in std):  # a channel with one value in every train pixel
            raise ValueError(
                f"dataset {name!r} from {where.found}: the train images' std per channel is "
                f"{std}; normalising needs every channel to vary"
            )
    else:
        mean, std = row.mean, row.std
    use_zca = row.zca_default if zca is None else zca
    info = DatasetInfo(
        name=name,
        num_classes=len(raw.class_names),
        channels=train_x.shape[1],
        image_size=train_x.shape[2],
        class_names=raw.class_names,
        mean=mean,
        std=std,
        zca=use_zca,
        zca_eps=ZCA_EPS if use_zca else None,
        source=str(where.found),
        val_per_class=per_class,
    )
    stats = channel_stats(info, train_x)
    for x in (train_x, val_x, test_x):  # in place: ImageNet-sized sets are large
        x.sub_(stats[0]).div_(stats[1])
    whitening = None
    if use_zca:
        whitening = fit_zca(train_x)
        train_x, val_x, test_x = whitening(train_x), whitening(val_x), whitening(test_x)
    return Dataset(
        info=info,
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=torch.from_numpy(np.ascontiguousarray(raw.test_y)).long(),
        whitening=whitening,
        val_images=val_x,
        val_labels=val_y,
    )


VALIDATION_SEED = 0  # the split is the same for every run, whatever the run's own seed


def validation_indices(labels: Tensor, per_class: int, num_classes: int) -> Tensor:
    """Indices of the validation split among the training files' ``labels`` (N,): the first
    ``per_class`` of a permutation of each class's rows drawn from
    ``seeded_generator(VALIDATION_SEED)`` (:func:`tesla_func.sampling.per_class_indices`), sorted.
    Fixed: it depends on the labels only, never on a run's seed."""
    if per_class == 0:
        return torch.zeros(0, dtype=torch.long)
    index = per_class_indices(labels, per_class, seeded_generator(VALIDATION_SEED), num_classes)
    return index.sort().values


def _validation_size(row: DatasetSpec, labels: Tensor, class_names: tuple[str, ...], where: Path,
                     asked: int | None) -> int:
    """Images per class to hold out: as asked, else the registry row's, else a sixth of the
    smallest class."""
    counts = torch.bincount(labels, minlength=len(class_names))
    smallest = int(counts.min())
    per_class = asked if asked is not None else row.val_per_class
    per_class = per_class if per_class is not None else max(1, smallest // 6)
    if not isinstance(per_class, int) or per_class < 0:
        raise ValueError(f"val_per_class must be an int >= 0, got {per_class!r}")
    if per_class and smallest <= per_class:
        c = int(counts.argmin())
        raise ValueError(
            f"dataset {row.name!r} from {where}: class {class_names[c]!r} has {smallest} "
            f"training images, too few to hold out {per_class} for validation and train on the "
            "rest; give every class at least " + str(per_class + 1)
        )
    return per_class


def fit_zca(images: Tensor, eps: float = ZCA_EPS) -> ZCAWhitening:
    """kornia's ZCA whitening fitted on (N, C, H, W) ``images`` (samples on dim 0), invertible."""
    from kornia.enhance import ZCAWhitening  # where used: see the TYPE_CHECKING import

    return ZCAWhitening(eps=eps, compute_inv=True).fit(images)


# ----------------------------------------------------------------------------------------------
# A dataset as a file recorded it: reloaded, checked, and undone
# ----------------------------------------------------------------------------------------------


def check_same_dataset(saved: dict, info: DatasetInfo, what: str) -> None:
    """Raise ValueError unless ``info`` (a loaded dataset) is the dataset ``saved`` describes.

    ``saved`` is the ``dataset_info`` an expert or synthetic-set header recorded (older files lack
    some keys; those are not compared). Compared: the name, classes, channels, image size and ZCA,
    the class names, and for datasets read only from a root ("folder") the root itself: every
    folder dataset is named "folder", so the path is what tells two of them apart. ``what`` names
    the file(s) in the message.
    """
    problems = []
    if saved.get("name", info.name) != info.name:
        problems.append(f"dataset {saved['name']!r} there, {info.name!r} here")
    for key in ("num_classes", "channels", "image_size", "zca", "val_per_class"):
        if key in saved and saved[key] != getattr(info, key):
            problems.append(f"{key} {saved[key]!r} there, {getattr(info, key)!r} here")
    if "class_names" in saved and tuple(saved["class_names"]) != info.class_names:
        there, here = tuple(saved["class_names"]), info.class_names
        first = next((i for i, (a, b) in enumerate(zip(there, here)) if a != b),
                     min(len(there), len(here)))
        problems.append(
            f"class names differ from class {first} on: "
            f"{list(there[first:first + 5])} there, {list(here[first:first + 5])} here"
        )
    read_from_root = info.name in DATASETS and spec(info.name).root_only  # (or made in memory)
    if read_from_root and "source" in saved and saved["source"] != info.source:
        problems.append(f"read from {saved['source']} there, from {info.source} here")
    if problems:
        raise ValueError(
            f"{what} was made from another dataset than the one loaded ({info.name!r} from "
            f"{info.source}): {'; '.join(problems)}"
        )


def load_dataset_like(saved: dict, root: str | Path | None = None, *, what: str = "the file"
                      ) -> Dataset:
    """Reload the dataset a file's ``dataset_info`` describes, and check it is that dataset.

    Same name, ZCA setting and validation split; for "folder" the same image size (S x S:
    resizing images that already have that size changes nothing, so this reproduces a load with
    or without ``image_size``) and, without ``root``, the recorded root (``source``). Then
    :func:`check_same_dataset`. Raises what :func:`load_dataset` raises (FileNotFoundError when
    the files are gone), and ValueError when another dataset is found there.
    """
    name = saved["name"]
    row = spec(name)
    if root is None and row.root_only:
        root = saved.get("source")
    options = {"image_size": saved.get("image_size")} if "image_size" in row.read_options else {}
    # the validation split it recorded (files from before the split held nothing out)
    dataset = load_dataset(name, root, zca=bool(saved.get("zca", False)),
                           val_per_class=int(saved.get("val_per_class", 0)), **options)
    check_same_dataset(saved, dataset.info, what)
    return dataset


def pixels_from_info(
    images: Tensor,
    saved: dict,
    *,
    dataset: Dataset | None = None,
    root: str | Path | None = None,
) -> tuple[Tensor, str]:
    """(B, C, H, W) network inputs -> (pixels about [0, 1], note), from a file's ``dataset_info``.

    Mean/std are in ``saved`` and are undone directly. ZCA's fitted whitening is not stored in the
    files (it is a (CHW)^2 matrix: 38 MB for CIFAR), so a ZCA-whitened set needs its dataset:
    ``dataset`` if given (checked against ``saved``), else the one ``saved`` names, refitted
    (:func:`load_dataset_like`, ``root`` as there). When that dataset is not found, the whitened
    images come back unchanged with a note saying so (the caller scales them for display); the
    note is empty when the result is pixels.
    """
    if dataset is not None:
        check_same_dataset(saved, dataset.info, "the images")
        return dataset.to_pixels(images), ""
    if not saved.get("zca", False):
        mean, std = _saved_stats(saved, images)
        return images * std + mean, ""
    try:
        dataset = load_dataset_like(saved, root, what="the images")
    except FileNotFoundError:
        return images, (f"ZCA-whitened, shown min-max scaled per image: dataset "
                        f"{saved['name']!r} (needed to undo ZCA) was not found")
    return dataset.to_pixels(images), ""


def inputs_from_info(
    pixels: Tensor,
    saved: dict,
    *,
    dataset: Dataset | None = None,
    root: str | Path | None = None,
) -> Tensor:
    """(B, C, H, W) pixels in [0, 1] -> the network inputs of the dataset a file's
    ``dataset_info`` describes: the inverse of :func:`pixels_from_info`.

    Mean/std come from ``saved``. A ZCA-whitened dataset needs its fitted whitening: ``dataset``
    if given (checked against ``saved``), else the one ``saved`` names, refitted
    (:func:`load_dataset_like`, ``root`` as there; FileNotFoundError when it is not found).
    """
    if dataset is not None:
        check_same_dataset(saved, dataset.info, "the images")
        return dataset.from_pixels(pixels)
    if saved.get("zca", False):
        return load_dataset_like(saved, root, what="the images").from_pixels(pixels)
    mean, std = _saved_stats(saved, pixels)
    return (pixels - mean) / std


def _saved_stats(saved: dict, like: Tensor) -> tuple[Tensor, Tensor]:
    """``saved``'s mean and std as (1, C, 1, 1) tensors of ``like``'s dtype and device."""
    shape = (1, -1, 1, 1)
    mean = torch.tensor(saved["mean"], dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(saved["std"], dtype=like.dtype, device=like.device).view(shape)
    return mean, std

"""Real image datasets behind one registry: ``load_dataset(name, root=None)``.

Every dataset comes back the same way: train and test images as float32 ``(N, C, H, W)`` tensors,
normalised per channel by a fixed mean/std (and ZCA-whitened where asked), labels as int64
``(N,)``, and a :class:`DatasetInfo` with classes, shape and the normalisation, so that a synthetic
set can be turned back into pixels with :meth:`Dataset.to_pixels`.

=================  ==========================================================  ==================
name               files read (standard formats)                               default ZCA
=================  ==========================================================  ==================
``fashion-mnist``  the four IDX ``*-ubyte.gz`` files (or unzipped)              no
``digits``         scikit-learn's bundled 8x8 digits, no files                  no
``cifar10``        ``cifar-10-python.tar.gz`` or its ``cifar-10-batches-py/``   yes (eps 0.1)
``cifar100``       ``cifar-100-python.tar.gz`` or its ``cifar-100-python/``     yes (eps 0.1)
``imagenet64``     downsampled ImageNet ``train_data_batch_*.npz``,              no
                   ``val_data.npz`` (Chrabaszcz et al. 2017)
``folder``         your own PNG/JPEG images, one sub-folder per class            no
                   (``root=`` only; see below)
=================  ==========================================================  ==================

Where the files are looked for, in order:

1. ``root=`` if given (that folder and ``root/<name>``), and nowhere else;
2. every folder in the environment variable ``TESLA_FUNC_DATA`` (``os.pathsep``-separated), as
   ``<folder>/<name>`` and ``<folder>`` itself;
3. the user folder ``$XDG_DATA_HOME/tesla_func/<name>`` (``~/.local/share/tesla_func/<name>``);
4. the dataset's system folder: Fashion-MNIST's Debian package ``dataset-fashion-mnist``
   installs into ``/usr/share/datasets/fashion-mnist``.

Nothing is downloaded: CIFAR and ImageNet cannot be fetched on the machines this was written on,
and a missing dataset raises ``FileNotFoundError`` saying where it looked and how to get it.

Your own images (``load_dataset("folder", root=DIR, image_size=S)``), decoded by Pillow:

- **Layout.** ``DIR/<class>/<image>``: one sub-folder per class; the class names are the sorted
  folder names, and label k is the k-th of them. Or ``DIR/train/<class>/...`` with
  ``DIR/test/<class>/...``, the same class folders in both (other folders beside ``train/`` and
  ``test/``, such as ``val/``, are not read). Images are the files directly in a class folder
  ending in ``.png``, ``.jpg`` or ``.jpeg`` (any case), decoded only as PNG or JPEG whatever the
  extension says; names starting with ``.`` and all other files and folders are skipped.
- **Where.** Read only from ``root`` itself (not ``root/folder``): ``TESLA_FUNC_DATA`` and the
  user folder are not searched, so ``search_dirs("folder")`` is empty without a root.
- **Order.** Train and test images come class by class (label order), by file name within one.
- **Split.** Without ``train/`` and ``test/``, each class of n >= 2 images holds out
  ``max(1, n // 6)`` as test (:data:`FOLDER_TEST_EVERY`): the files whose SHA-256 of
  ``"<seed>:<class>/<file name>"`` is smallest, with seed :data:`FOLDER_SPLIT_SEED` (0). The
  split depends only on the class and file names: not on the order files were written or listed,
  nor on numpy or torch versions; adding an image moves at most one other image of its class.
- **Size.** ``image_size=S`` resizes every image to S x S with Pillow's bilinear filter
  (``Image.Resampling.BILINEAR``, which antialiases when shrinking); a non-square image is
  stretched, not cropped. Without it, all images must share one square size, which is kept.
- **Channels.** Grey (PNG/JPEG modes ``1``, ``L``, ``LA``) gives 1 channel; colour (``RGB``,
  ``RGBA``, ``CMYK``, ``YCbCr``, and palette ``P``/``PA`` images) gives 3. Alpha is dropped, not
  composited; EXIF orientation is applied. A folder mixing grey and colour images is refused
  (the error names one of each); so are 16-bit and float images.
- **Normalisation.** Mean and std per channel of the (resized) train images; ZCA off by default.
- **Name.** ``info.name`` is ``"folder"`` whatever the root (expert files and configs record the
  dataset by the name given to ``load_dataset``); ``info.source`` is the root's absolute path,
  and ``info.class_names`` the folder names, for errors that name a class.

The CIFAR files are Python pickles (their official format). A pickle can run code, so they are read
with a restricted unpickler that only rebuilds numpy arrays, lists, dicts and bytes; anything else
in the file is refused with an error naming it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from kornia.enhance import ZCAWhitening
from PIL import Image, ImageOps
from torch import Tensor

from tesla_func.models import ConvNetConfig
from tesla_func.sampling import per_class_indices, seeded_generator

ENV_VAR = "TESLA_FUNC_DATA"
ZCA_EPS = 0.1  # docs/reference.md section 3: kornia ZCAWhitening(eps=0.1), as MTT and TESLA use


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
        mean, std = _channel_stats(self.info, pixels)
        x = (pixels - mean) / std
        return self.whitening(x) if self.whitening is not None else x

    def to_pixels(self, images: Tensor) -> Tensor:
        """Inverse of :meth:`from_pixels`: (B, C, H, W) network inputs -> pixels (about [0, 1])."""
        x = self.whitening.inverse_transform(images) if self.whitening is not None else images
        mean, std = _channel_stats(self.info, x)
        return x * std + mean


def _channel_stats(info: DatasetInfo, like: Tensor) -> tuple[Tensor, Tensor]:
    shape = (1, info.channels, 1, 1)
    mean = torch.tensor(info.mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(info.std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


@dataclass(frozen=True)
class _Raw:
    """What a reader returns: uint8 images (N, C, H, W) and int64 labels, before normalisation."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple[str, ...]
    max_value: float = 255.0  # pixel value that maps to 1.0


@dataclass(frozen=True)
class DatasetShape:
    """What a registered dataset looks like, known without reading its files (the memory
    planner needs no data)."""

    channels: int  # C
    image_size: int  # H = W, pixels
    num_classes: int  # K
    train_size: int  # images in the training files (validation split included)


@dataclass(frozen=True)
class _Spec:
    """One registry entry: where to find a dataset, how to read it and how to normalise it."""

    name: str
    summary: str  # for `tesla-func data`
    shape: DatasetShape | None  # None: only known once the files are read ("folder")
    # images per class held out of the training files as the validation split; None: one
    # sixth of the smallest class (at least 1)
    val_per_class: int | None
    mean: tuple[float, ...] | None  # None: computed from the train images
    std: tuple[float, ...] | None
    zca_default: bool
    find: Callable[[Path], Path | None]  # folder -> the file/folder to read, or None
    read: Callable[..., _Raw]  # (found path, **the read_options below) -> _Raw
    how_to_get: str  # what to do when the files are missing
    system_dirs: tuple[Path, ...] = ()
    needs_files: bool = True
    root_only: bool = False  # read only from root= (no env var, user or system folders)
    read_options: tuple[str, ...] = ()  # keyword arguments of load_dataset passed on to read
    # called instead of the generic "not found" error, to raise one that says what is wrong
    explain_missing: Callable[[Path | None], None] | None = None


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files
# ----------------------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) of unsigned bytes -> numpy uint8 array of its dims.

    Format: 2 zero bytes, type byte 0x08 (ubyte), number of dims n, n big-endian uint32 sizes, then
    the bytes in C order. A truncated or malformed file raises ValueError naming it.
    """
    try:
        raw = path.read_bytes()
        # bytearray: a writable buffer, so torch.from_numpy later shares it without a warning.
        raw = bytearray(gzip.decompress(raw) if path.suffix == ".gz" else raw)
    except (EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{path} is truncated or not a gzip file ({err}); fetch it again") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    start = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = start + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: its header promises dims {dims} ({expected} bytes) "
            f"but it holds {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Fashion-MNIST file {stem}.gz (or {stem}) is missing from {folder}")


def _find_fashion(folder: Path) -> Path | None:
    has = any((folder / f"{_FASHION_FILES['train_x']}{s}").is_file() for s in (".gz", ""))
    return folder if has else None


def _read_fashion(folder: Path) -> _Raw:
    arrays = {key: read_idx(_idx_file(folder, stem)) for key, stem in _FASHION_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"Fashion-MNIST {split} files in {folder} do not match: images {x.shape}, "
                f"labels {y.shape}"
            )
    return _Raw(
        train_x=arrays["train_x"][:, None],  # (N, 1, 28, 28)
        train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"][:, None],
        test_y=arrays["test_y"].astype(np.int64),
        class_names=FASHION_CLASSES,
    )


# ----------------------------------------------------------------------------------------------
# digits: scikit-learn's 8x8 set, fixed split
# ----------------------------------------------------------------------------------------------

DIGITS_TEST_EVERY = 5  # sample i is a test sample iff i % 5 == 4: 1438 train, 359 test, fixed


def _read_digits(_: Path) -> _Raw:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    test = np.arange(len(labels)) % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
    return _Raw(
        train_x=images[~test],
        train_y=labels[~test],
        test_x=images[test],
        test_y=labels[test],
        class_names=tuple(str(d) for d in range(10)),
        max_value=16.0,
    )


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: the python-pickle batches, in a folder or in the .tar.gz
# ----------------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers, bytes and numpy arrays: the CIFAR files need nothing else.

    ``pickle.load`` would import and call any global the file names; here only the constructors a
    numpy array's pickle uses are allowed, so a tampered file cannot run code.
    """

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles from Python 3 spell bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a numpy array")
        # numpy 2 renamed numpy.core to numpy._core (the old name warns): try the new one first.
        if module.startswith("numpy.core"):
            spellings = ["numpy._core" + module[len("numpy.core") :], module]
        elif module.startswith("numpy._core"):
            spellings = [module, "numpy.core" + module[len("numpy._core") :]]
        else:
            spellings = [module]
        for spelling in spellings[:-1]:
            try:
                return super().find_class(spelling, name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(spellings[-1], name)


def _unpickle(data: bytes, where: str) -> dict:
    """Bytes of one CIFAR batch -> dict with str keys. Errors name ``where``."""
    try:
        # encoding="bytes": the files were pickled by Python 2; their str keys arrive as bytes.
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        KeyError,
        IndexError,
    ) as err:
        raise ValueError(f"{where} is truncated or not a CIFAR batch ({err})") from err
    if not isinstance(obj, dict):
        # A bad file is bad input (ValueError, like every other corrupt-file error here).
        kind = type(obj).__name__
        raise ValueError(f"{where} is not a CIFAR batch: it holds a {kind}")  # noqa: TRY004
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


@dataclass(frozen=True)
class _CifarLayout:
    folder: str  # folder inside the archive
    archive: str  # official archive name
    url: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str


_CIFAR = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch",
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        train=("train",),
        test="test",
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}


def _find_cifar(layout: _CifarLayout) -> Callable[[Path], Path | None]:
    def find(folder: Path) -> Path | None:
        for candidate in (folder / layout.folder, folder):
            if (candidate / layout.train[0]).is_file():
                return candidate
        archive = folder / layout.archive
        return archive if archive.is_file() else None

    return find


def _read_cifar(layout: _CifarLayout) -> Callable[[Path], _Raw]:
    def read(path: Path) -> _Raw:
        members = (*layout.train, layout.test, layout.meta)
        blobs = (
            _read_archive(path, layout.folder, members)
            if path.is_file()
            else {m: _read_member_file(path / m) for m in members}
        )
        meta = _unpickle(blobs[layout.meta], f"{path}:{layout.meta}")
        names = tuple(
            n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout.names_key]
        )
        train = [_cifar_batch(blobs[m], f"{path}:{m}", layout, len(names)) for m in layout.train]
        test_x, test_y = _cifar_batch(
            blobs[layout.test], f"{path}:{layout.test}", layout, len(names)
        )
        return _Raw(
            train_x=np.concatenate([x for x, _ in train]),
            train_y=np.concatenate([y for _, y in train]),
            test_x=test_x,
            test_y=test_y,
            class_names=names,
        )

    return read


def _read_member_file(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the CIFAR folder is incomplete")
    return path.read_bytes()


def _read_archive(archive: Path, folder: str, members: tuple[str, ...]) -> dict[str, bytes]:
    """Read ``folder/<member>`` for each member out of a .tar.gz without unpacking it to disk."""
    out = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in members:
                try:
                    f = tar.extractfile(f"{folder}/{member}")
                except KeyError:
                    f = None
                if f is None:
                    raise ValueError(f"{archive} has no file {folder}/{member}")
                out[member] = f.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ValueError(
            f"{archive} is truncated or not a tar archive ({err}); fetch it again"
        ) from err
    return out


def _cifar_batch(data: bytes, where: str, layout: _CifarLayout, num_classes: int):
    batch = _unpickle(data, where)
    if "data" not in batch or layout.label_key not in batch:
        raise ValueError(f"{where} lacks 'data' or '{layout.label_key}': not a CIFAR batch")
    x = np.asarray(batch["data"])
    y = np.asarray(batch[layout.label_key], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise ValueError(
            f"{where}: expected uint8 data (N, 3072) and N labels, got data {x.dtype} {x.shape} "
            f"and {len(y)} labels"
        )
    _check_labels(y, num_classes, where)
    # Each row is the red plane, then green, then blue, each 32x32 row-major.
    return x.reshape(-1, 3, 32, 32), y


def _check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{where}: labels outside [0, {num_classes}): {y.min()}..{y.max()}")


# ----------------------------------------------------------------------------------------------
# Downsampled ImageNet 64x64: .npz batches
# ----------------------------------------------------------------------------------------------

_IMAGENET64_TRAIN = re.compile(r"train_data_batch_(\d+)\.npz$")


def _find_imagenet64(folder: Path) -> Path | None:
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
    _check_labels(y, 1000, str(path))
    return x.reshape(-1, 3, side, side), y  # rows are R plane, G plane, B plane like CIFAR


def _read_imagenet64(folder: Path) -> _Raw:
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
    return _Raw(
        train_x=np.concatenate([x for x, _ in train]),
        train_y=np.concatenate([y for _, y in train]),
        test_x=test_x,
        test_y=test_y,
        class_names=tuple(f"class {i}" for i in range(1000)),  # the files carry no names
    )


# ----------------------------------------------------------------------------------------------
# Your own images: a folder of class folders of PNG/JPEG files, decoded by Pillow
# ----------------------------------------------------------------------------------------------

FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg")  # image files, matched in any case
FOLDER_FORMATS = ("PNG", "JPEG")  # the only decoders Pillow may use, whatever the extension
FOLDER_TEST_EVERY = 6  # without train/ + test/: max(1, n // 6) of a class's n images are test
FOLDER_SPLIT_SEED = 0  # salt of the split's hash (see _split_class)
FOLDER_RESAMPLE = Image.Resampling.BILINEAR  # antialiased when shrinking (Pillow convolves)
_GREY_MODES = frozenset({"1", "L", "LA", "La"})  # -> "L", 1 channel
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "P", "PA"})  # -> "RGB"
_FOLDER_LAYOUT = (
    "one sub-folder of PNG/JPEG images per class, or train/ and test/ folders holding such "
    "class folders"
)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")  # .git, .ipynb_checkpoints, macOS ._foo.png


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if _visible(p) and p.is_dir()), key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    """The images directly in ``folder``, sorted by name."""
    return sorted(
        (
            p
            for p in folder.iterdir()
            if _visible(p) and p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file()
        ),
        key=lambda p: p.name,
    )


def _is_pair(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def _find_folder(folder: Path) -> Path | None:
    """``folder`` (absolute) if some class folder in it (or in its train/) holds an image."""
    top = folder / "train" if _is_pair(folder) else folder
    has_image = any(
        any(_visible(p) and p.suffix.lower() in FOLDER_EXTENSIONS for p in d.iterdir())
        for d in _class_dirs(top)
    )
    return folder.absolute() if has_image else None


def _explain_missing_folder(root: Path | None) -> None:
    """Raise the error that says why ``root`` is not a folder dataset."""
    if root is None:
        raise FileNotFoundError(
            "dataset 'folder' is read only from root=DIR (--root DIR): a folder holding "
            f"{_FOLDER_LAYOUT}"
        )
    _folder_layout(root)  # raises, naming what is wrong
    raise FileNotFoundError(f"{root} holds no PNG/JPEG image in its class folders")


def _class_names(folder: Path) -> tuple[str, ...]:
    names = tuple(d.name for d in _class_dirs(folder))
    if not names:
        raise ValueError(
            f"{folder} has no class folders: the folder dataset needs {_FOLDER_LAYOUT}"
        )
    return names


def _class_images(folder: Path, name: str) -> list[Path]:
    files = _image_files(folder)
    if not files:
        raise ValueError(
            f"class {name!r} is empty: {folder} holds no {'/'.join(FOLDER_EXTENSIONS)} image"
        )
    return files


def _split_class(name: str, files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, test) files of one class, both in name order: the fixed, seeded split.

    The test files are the ``max(1, n // FOLDER_TEST_EVERY)`` whose SHA-256 of
    ``"<FOLDER_SPLIT_SEED>:<class>/<file name>"`` is smallest: a function of the names alone.
    """
    if len(files) < 2:
        raise ValueError(
            f"class {name!r} has 1 image ({files[0]}); the fixed split needs at least 2 "
            "(one held out as test): add images, or give train/ and test/ folders"
        )
    n_test = max(1, len(files) // FOLDER_TEST_EVERY)
    key = {
        p: hashlib.sha256(f"{FOLDER_SPLIT_SEED}:{name}/{p.name}".encode()).hexdigest()
        for p in files
    }
    test = set(sorted(files, key=lambda p: (key[p], p.name))[:n_test])
    return [p for p in files if p not in test], [p for p in files if p in test]


def _folder_layout(root: Path) -> tuple[tuple[str, ...], list[list[Path]], list[list[Path]]]:
    """(class names, train files per class, test files per class); bad layouts are named."""
    if not root.exists():
        raise FileNotFoundError(f"folder dataset root {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"folder dataset root {root} is a file, not a folder")
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() != test_dir.is_dir():
        there, absent = ("train", "test") if train_dir.is_dir() else ("test", "train")
        raise ValueError(
            f"{root} has {there}/ but no {absent}/: give both, with the same class folders, or "
            "neither (one folder per class, split here)"
        )
    if not _is_pair(root):
        names = _class_names(root)
        split = [_split_class(n, _class_images(root / n, n)) for n in names]
        return names, [train for train, _ in split], [test for _, test in split]
    names = _class_names(train_dir)
    test_names = _class_names(test_dir)
    for name in names:
        if name not in test_names:
            raise ValueError(f"class {name!r} is missing from {test_dir} (it is in {train_dir})")
    for name in test_names:
        if name not in names:
            raise ValueError(f"class {name!r} is in {test_dir} but missing from {train_dir}")
    train = [_class_images(train_dir / n, n) for n in names]
    test = [_class_images(test_dir / n, n) for n in names]
    return names, train, test


def _open_image(path: Path) -> Image.Image:
    """Decode one file (PNG or JPEG only), EXIF orientation applied. Errors name the file."""
    try:
        with Image.open(path, formats=FOLDER_FORMATS) as im:
            im.load()
            return ImageOps.exif_transpose(im)  # a new, loaded image: the file can close
    except (OSError, SyntaxError, ValueError, EOFError, struct.error,
            Image.DecompressionBombError) as err:
        raise ValueError(f"{path} is not a readable PNG/JPEG image ({err})") from err


def _decode_images(files: list[Path], image_size: int | None) -> np.ndarray:
    """Files -> uint8 (N, C, S, S), C = 1 or 3 for all; mixed kinds and sizes are named."""
    first: dict[str, tuple[Path, str]] = {}  # "grey" / "colour" -> the first such file, its mode
    out = None
    for i, path in enumerate(files):
        im = _open_image(path)
        if im.mode in _GREY_MODES:
            kind = "grey"
        elif im.mode in _COLOUR_MODES:
            kind = "colour"
        else:
            raise ValueError(
                f"{path} has Pillow mode {im.mode!r} (16-bit or float pixels?); only 8-bit grey "
                "or colour images are read: save it as 8-bit"
            )
        first.setdefault(kind, (path, im.mode))
        if len(first) == 2:
            (grey, grey_mode), (colour, colour_mode) = first["grey"], first["colour"]
            raise ValueError(
                f"mixed channel counts: {grey} is grey (mode {grey_mode}) but {colour} is colour "
                f"(mode {colour_mode}); convert the images to one kind"
            )
        if kind == "colour" and im.mode in ("P", "PA"):
            im = im.convert("RGBA")  # a palette with transparency: through RGBA, as Pillow asks
        im = im.convert("L" if kind == "grey" else "RGB")  # alpha dropped
        if out is None:
            if image_size is None and im.width != im.height:
                raise ValueError(
                    f"{path} is {im.width}x{im.height}, not square: pass image_size=S to resize "
                    "every image to SxS (stretched)"
                )
            side = image_size or im.width
            out = np.empty((len(files), len(im.getbands()), side, side), dtype=np.uint8)
            first_size = (path, im.size)
        if image_size is None and im.size != first_size[1]:
            (w0, h0), (w, h) = first_size[1], im.size
            raise ValueError(
                f"images differ in size: {first_size[0]} is {w0}x{h0} but {path} is {w}x{h}; "
                "pass image_size=S to resize every image to SxS"
            )
        if im.size != (out.shape[3], out.shape[2]):
            im = im.resize((out.shape[3], out.shape[2]), FOLDER_RESAMPLE)
        pixels = np.asarray(im)  # (S, S) grey or (S, S, 3) colour
        out[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return out


def _read_folder(root: Path, image_size: int | None = None) -> _Raw:
    if image_size is not None and (
        not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    names, train, test = _folder_layout(root)
    train_files = [p for files in train for p in files]
    images = _decode_images(train_files + [p for files in test for p in files], image_size)

    def labels(per_class: list[list[Path]]) -> np.ndarray:
        return np.repeat(np.arange(len(names), dtype=np.int64), [len(f) for f in per_class])

    return _Raw(
        train_x=images[: len(train_files)],
        train_y=labels(train),
        test_x=images[len(train_files) :],
        test_y=labels(test),
        class_names=names,
    )


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------

_ENV_HINT = f"or pass root=DIR (--root DIR) or set {ENV_VAR}=DIR"
_SPECS: dict[str, _Spec] = {
    "fashion-mnist": _Spec(
        name="fashion-mnist",
        shape=DatasetShape(1, 28, 10, 60_000),
        val_per_class=500,
        summary="55000 train + 5000 validation / 10000 test, 28x28x1, 10 classes",
        mean=(0.2860,),
        std=(0.3530,),  # DC-bench's values
        zca_default=False,
        find=_find_fashion,
        read=_read_fashion,
        how_to_get="install it with `apt-get install dataset-fashion-mnist` (as root), "
        f"{_ENV_HINT} "
        "holding the four *-ubyte.gz files",
        system_dirs=(FASHION_MNIST_DIR,),
    ),
    "digits": _Spec(
        name="digits",
        shape=DatasetShape(1, 8, 10, 1_438),
        val_per_class=20,
        summary="1238 train + 200 validation / 359 test, 8x8x1, 10 classes",
        mean=None,
        std=None,
        zca_default=False,
        find=lambda folder: folder,
        read=_read_digits,
        how_to_get="install scikit-learn",
        needs_files=False,
    ),
    "cifar10": _Spec(
        name="cifar10",
        shape=DatasetShape(3, 32, 10, 50_000),
        val_per_class=500,
        summary="45000 train + 5000 validation / 10000 test, 32x32x3, 10 classes",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),  # MTT's values
        zca_default=True,
        find=_find_cifar(_CIFAR["cifar10"]),
        read=_read_cifar(_CIFAR["cifar10"]),
        how_to_get=f"download {_CIFAR['cifar10'].url} (the python version), {_ENV_HINT} "
        "holding it or its unpacked cifar-10-batches-py/",
    ),
    "cifar100": _Spec(
        name="cifar100",
        shape=DatasetShape(3, 32, 100, 50_000),
        val_per_class=50,
        summary="45000 train + 5000 validation / 10000 test, 32x32x3, 100 classes",
        mean=(0.5071, 0.4866, 0.4409),
        std=(0.2673, 0.2564, 0.2762),  # MTT's values
        zca_default=True,
        find=_find_cifar(_CIFAR["cifar100"]),
        read=_read_cifar(_CIFAR["cifar100"]),
        how_to_get=f"download {_CIFAR['cifar100'].url} (the python version), {_ENV_HINT} "
        "holding it or its unpacked cifar-100-python/",
    ),
    "imagenet64": _Spec(
        name="imagenet64",
        shape=DatasetShape(3, 64, 1000, 1_281_167),
        val_per_class=10,
        summary="1271167 train + 10000 validation / 50000 test (the official val), 64x64x3, "
        "1000 classes (~63 GB as float32)",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),  # the usual ImageNet values
        zca_default=False,
        find=_find_imagenet64,
        read=_read_imagenet64,
        how_to_get="download Imagenet64_train_npz and Imagenet64_val_npz from "
        f"https://image-net.org/download-images (downsampled, npz), {_ENV_HINT} holding them",
    ),
    "folder": _Spec(
        name="folder",
        shape=None,
        val_per_class=None,
        summary="your own PNG/JPEG images, one sub-folder per class (or train/ and test/)",
        mean=None,
        std=None,
        zca_default=False,
        find=_find_folder,
        read=_read_folder,
        how_to_get=f"pass root=DIR (--root DIR), a folder holding {_FOLDER_LAYOUT}",
        root_only=True,
        read_options=("image_size",),
        explain_missing=_explain_missing_folder,
    ),
}
DATASETS: tuple[str, ...] = tuple(_SPECS)


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return _SPECS[name]


def shape(name: str) -> DatasetShape:
    """Channels, image side, classes and training-set size of a registered dataset, no files read.

    Raises KeyError for an unknown name or a dataset whose shape only its files tell ("folder";
    the messages list the known names).
    """
    spec = _spec(name)
    if spec.shape is None:
        fixed = [n for n, s in _SPECS.items() if s.shape is not None]
        raise KeyError(f"dataset {name!r} has no fixed shape (it is known once its files are "
                       f"read); datasets with one: {', '.join(fixed)}")
    return spec.shape


def search_dirs(name: str, root: str | Path | None = None) -> list[Path]:
    """The folders looked in for ``name``, in order (see the module docstring)."""
    spec = _spec(name)
    if spec.root_only:
        return [] if root is None else [Path(root)]
    if root is not None:
        return [Path(root), Path(root) / name]
    dirs = []
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry:
            dirs += [Path(entry) / name, Path(entry)]
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return dirs + [data_home / "tesla_func" / name, *spec.system_dirs]


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
    spec = _spec(name)
    searched = tuple(search_dirs(name, root))
    if not spec.needs_files:
        return Availability(name, spec.summary, Path("scikit-learn"), (), spec.how_to_get)
    found = next((hit for d in searched if d.is_dir() and (hit := spec.find(d)) is not None), None)
    return Availability(name, spec.summary, found, searched, spec.how_to_get)


def available(root: str | Path | None = None) -> list[Availability]:
    """:func:`locate` for every registered dataset."""
    return [locate(name, root) for name in DATASETS]


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
        ValueError: a truncated or corrupt file (names it); for "folder" also an empty class, a
            class missing from test/, grey and colour images mixed, sizes that differ without
            ``image_size`` (each names the class or files).
    """
    spec = _spec(name)
    options = {"image_size": image_size}
    for option, value in options.items():
        if value is not None and option not in spec.read_options:
            raise ValueError(f"{option}= is not an option of dataset {name!r}")
    where = locate(name, root)
    if where.found is None:
        if spec.explain_missing is not None:
            spec.explain_missing(None if root is None else Path(root))
        looked = ", ".join(str(d) for d in where.searched) or "(nowhere)"
        raise FileNotFoundError(
            f"dataset {name!r} not found; looked in: {looked}. To get it: {spec.how_to_get}."
        )
    raw = spec.read(where.found, **{option: options[option] for option in spec.read_options})
    train_y = torch.from_numpy(np.ascontiguousarray(raw.train_y)).long()
    per_class = _validation_size(spec, train_y, raw.class_names, where.found, val_per_class)
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
    if spec.mean is None:  # digits, folder: the train set's own statistics
        mean = tuple(train_x.mean(dim=(0, 2, 3)).tolist())
        std = tuple(train_x.std(dim=(0, 2, 3)).tolist())
        if not all(s > 0 for s in std):  # a channel with one value in every train pixel
            raise ValueError(
                f"dataset {name!r} from {where.found}: the train images' std per channel is "
                f"{std}; normalising needs every channel to vary"
            )
    else:
        mean, std = spec.mean, spec.std
    use_zca = spec.zca_default if zca is None else zca
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
    stats = _channel_stats(info, train_x)
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


def _validation_size(spec: _Spec, labels: Tensor, class_names: tuple[str, ...], where: Path,
                     asked: int | None) -> int:
    """Images per class to hold out: as asked, else the spec's number, else a sixth of the
    smallest class."""
    counts = torch.bincount(labels, minlength=len(class_names))
    smallest = int(counts.min())
    per_class = asked if asked is not None else spec.val_per_class
    per_class = per_class if per_class is not None else max(1, smallest // 6)
    if not isinstance(per_class, int) or per_class < 0:
        raise ValueError(f"val_per_class must be an int >= 0, got {per_class!r}")
    if per_class and smallest <= per_class:
        c = int(counts.argmin())
        raise ValueError(
            f"dataset {spec.name!r} from {where}: class {class_names[c]!r} has {smallest} "
            f"training images, too few to hold out {per_class} for validation and train on the "
            "rest; give every class at least " + str(per_class + 1)
        )
    return per_class


def fit_zca(images: Tensor, eps: float = ZCA_EPS) -> ZCAWhitening:
    """kornia's ZCA whitening fitted on (N, C, H, W) ``images`` (samples on dim 0), invertible."""
    return ZCAWhitening(eps=eps, compute_inv=True).fit(images)


# ----------------------------------------------------------------------------------------------
# A dataset as a file recorded it: reloaded, checked, and undone
# ----------------------------------------------------------------------------------------------


def dataset_options(name: str) -> tuple[str, ...]:
    """The keyword options of :func:`load_dataset` that dataset ``name`` takes (``("image_size",)``
    for "folder", none for the named datasets). Raises KeyError for an unknown name."""
    return _spec(name).read_options


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
    read_from_root = info.name in _SPECS and _SPECS[info.name].root_only  # (or made in memory)
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

    Same name, ZCA setting and validation split; for "folder" the same image size (S x S: resizing images that
    already have that size changes nothing, so this reproduces a load with or without
    ``image_size``) and, without ``root``, the recorded root (``source``). Then
    :func:`check_same_dataset`. Raises what :func:`load_dataset` raises (FileNotFoundError when
    the files are gone), and ValueError when another dataset is found there.
    """
    name = saved["name"]
    spec = _spec(name)
    if root is None and spec.root_only:
        root = saved.get("source")
    options = {"image_size": saved.get("image_size")} if "image_size" in spec.read_options else {}
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
        shape = (1, -1, 1, 1)
        mean = torch.tensor(saved["mean"], dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(saved["std"], dtype=images.dtype, device=images.device).view(shape)
        return images * std + mean, ""
    try:
        dataset = load_dataset_like(saved, root, what="the images")
    except FileNotFoundError:
        return images, (f"ZCA-whitened, shown min-max scaled per image: dataset "
                        f"{saved['name']!r} (needed to undo ZCA) was not found")
    return dataset.to_pixels(images), ""

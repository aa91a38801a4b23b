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

The CIFAR files are Python pickles (their official format). A pickle can run code, so they are read
with a restricted unpickler that only rebuilds numpy arrays, lists, dicts and bytes; anything else
in the file is refused with an error naming it.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
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
from torch import Tensor

from tesla_func.models import ConvNetConfig

ENV_VAR = "TESLA_FUNC_DATA"
ZCA_EPS = 0.1  # PROTOCOL.md section 3: kornia ZCAWhitening(eps=0.1), as MTT and TESLA use


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
class _Spec:
    """One registry entry: where to find a dataset, how to read it and how to normalise it."""

    name: str
    summary: str  # for `tesla-func data`
    mean: tuple[float, ...] | None  # None: computed from the train images
    std: tuple[float, ...] | None
    zca_default: bool
    find: Callable[[Path], Path | None]  # folder -> the file/folder to read, or None
    read: Callable[[Path], _Raw]
    how_to_get: str  # what to do when the files are missing
    system_dirs: tuple[Path, ...] = ()
    needs_files: bool = True


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
# The registry
# ----------------------------------------------------------------------------------------------

_ENV_HINT = f"or pass root=DIR (--root DIR) or set {ENV_VAR}=DIR"
_SPECS: dict[str, _Spec] = {
    "fashion-mnist": _Spec(
        name="fashion-mnist",
        summary="60000 train / 10000 test, 28x28x1, 10 classes",
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
        summary="1438 train / 359 test, 8x8x1, 10 classes",
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
        summary="50000 train / 10000 test, 32x32x3, 10 classes",
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
        summary="50000 train / 10000 test, 32x32x3, 100 classes",
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
        summary="1281167 train / 50000 val, 64x64x3, 1000 classes (~63 GB as float32)",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),  # the usual ImageNet values
        zca_default=False,
        find=_find_imagenet64,
        read=_read_imagenet64,
        how_to_get="download Imagenet64_train_npz and Imagenet64_val_npz from "
        f"https://image-net.org/download-images (downsampled, npz), {_ENV_HINT} holding them",
    ),
}
DATASETS: tuple[str, ...] = tuple(_SPECS)


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return _SPECS[name]


def search_dirs(name: str, root: str | Path | None = None) -> list[Path]:
    """The folders looked in for ``name``, in order (see the module docstring)."""
    spec = _spec(name)
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


def load_dataset(name: str, root: str | Path | None = None, *, zca: bool | None = None) -> Dataset:
    """Load a registered dataset: normalised float32 images, int64 labels and its metadata.

    Args:
        name: one of :data:`DATASETS`.
        root: folder holding the files; when given, the only place looked in.
        zca: whiten with kornia ``ZCAWhitening(eps=0.1)`` fitted on the normalised train images
            and applied to both splits; ``None`` takes the dataset's default (on for CIFAR).

    Raises:
        KeyError: unknown name (the message lists the known ones).
        FileNotFoundError: files missing (says where it looked and how to get them).
        ValueError: a truncated or corrupt file (names it).
    """
    spec = _spec(name)
    where = locate(name, root)
    if where.found is None:
        looked = ", ".join(str(d) for d in where.searched) or "(nowhere)"
        raise FileNotFoundError(
            f"dataset {name!r} not found; looked in: {looked}. To get it: {spec.how_to_get}."
        )
    raw = spec.read(where.found)
    train_x = torch.from_numpy(np.ascontiguousarray(raw.train_x)).float().div_(raw.max_value)
    test_x = torch.from_numpy(np.ascontiguousarray(raw.test_x)).float().div_(raw.max_value)
    if spec.mean is None:  # digits: the train set's own statistics
        mean = tuple(train_x.mean(dim=(0, 2, 3)).tolist())
        std = tuple(train_x.std(dim=(0, 2, 3)).tolist())
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
    )
    stats = _channel_stats(info, train_x)
    train_x = train_x.sub_(stats[0]).div_(stats[1])  # in place: ImageNet-sized sets are large
    test_x = test_x.sub_(stats[0]).div_(stats[1])
    whitening = None
    if use_zca:
        whitening = fit_zca(train_x)
        train_x, test_x = whitening(train_x), whitening(test_x)
    return Dataset(
        info=info,
        train_images=train_x,
        train_labels=torch.from_numpy(np.ascontiguousarray(raw.train_y)).long(),
        test_images=test_x,
        test_labels=torch.from_numpy(np.ascontiguousarray(raw.test_y)).long(),
        whitening=whitening,
    )


def fit_zca(images: Tensor, eps: float = ZCA_EPS) -> ZCAWhitening:
    """kornia's ZCA whitening fitted on (N, C, H, W) ``images`` (samples on dim 0), invertible."""
    return ZCAWhitening(eps=eps, compute_inv=True).fit(images)


# ----------------------------------------------------------------------------------------------
# Shapes without files: what the memory planner (tesla_func.planner) needs to know of a dataset
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetShape:
    """What a registered dataset looks like, known without reading its files."""

    channels: int  # C
    image_size: int  # H = W, pixels
    num_classes: int  # K
    train_size: int  # training images


_SHAPES: dict[str, DatasetShape] = {
    "fashion-mnist": DatasetShape(1, 28, 10, 60_000),
    "digits": DatasetShape(1, 8, 10, 1_438),  # the fixed 80 % train split of 1797
    "cifar10": DatasetShape(3, 32, 10, 50_000),
    "cifar100": DatasetShape(3, 32, 100, 50_000),
    "imagenet64": DatasetShape(3, 64, 1000, 1_281_167),
}


def shape(name: str) -> DatasetShape:
    """Channels, image side, classes and training-set size of a registered dataset, no files read.

    Raises:
        KeyError: an unknown name, or a registered dataset without a shape entry (the message
            lists the known ones).
    """
    if name not in _SHAPES:
        raise KeyError(
            f"no shape known for dataset {name!r}; known: {', '.join(_SHAPES)} "
            "(a new dataset needs an entry in tesla_func.data._SHAPES)"
        )
    return _SHAPES[name]

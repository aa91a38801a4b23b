"""IDX files: Fashion-MNIST.

The four files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
and ``t10k-labels-idx1-ubyte``, gzipped (``*.gz``, as distributed) or unzipped, in one folder. An
IDX file is 2 zero bytes, the type byte 0x08 (unsigned bytes), the number of dims n, n big-endian
uint32 sizes, then the bytes in C order (:func:`read_idx`). Images are 28x28 grey, labels 0..9;
the class names are not in the files (:data:`FASHION_CLASSES`).

The reader interface (:mod:`tesla_func.data`): :func:`find` and :func:`read`.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from tesla_func.data.types import RawArrays

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


def find(folder: Path) -> Path | None:
    """``folder`` if it holds the Fashion-MNIST train images (gzipped or not), else None."""
    has = any((folder / f"{_FASHION_FILES['train_x']}{s}").is_file() for s in (".gz", ""))
    return folder if has else None


def read(folder: Path) -> RawArrays:
    """The four Fashion-MNIST files in ``folder`` -> (N, 1, 28, 28) images and their labels."""
    arrays = {key: read_idx(_idx_file(folder, stem)) for key, stem in _FASHION_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"Fashion-MNIST {split} files in {folder} do not match: images {x.shape}, "
                f"labels {y.shape}"
            )
    return RawArrays(
        train_x=arrays["train_x"][:, None],  # (N, 1, 28, 28)
        train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"][:, None],
        test_y=arrays["test_y"].astype(np.int64),
        class_names=FASHION_CLASSES,
    )

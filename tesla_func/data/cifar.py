"""CIFAR-10 and CIFAR-100: the python-pickle batches, in a folder or in the official .tar.gz.

Read from ``cifar-10-python.tar.gz`` (``cifar-100-python.tar.gz``) without unpacking it, or from
its unpacked folder ``cifar-10-batches-py/`` (``cifar-100-python/``), or from a folder holding the
batch files themselves. Each batch is a pickled dict: ``data``, uint8 (N, 3072), each row the red
plane, then green, then blue, each 32x32 row-major; and the labels (``labels``, or
``fine_labels`` for CIFAR-100). The class names are in the meta file (:class:`CifarLayout` names
the files and keys of each).

The files are Python pickles (their official format). A pickle can run code, so they are read
with a restricted unpickler that only rebuilds numpy arrays, lists, dicts and bytes; anything else
in the file is refused with an error naming it. Nothing else in the package unpickles.

The reader interface (:mod:`tesla_func.data`): :func:`find` and :func:`read`, each taking the
dataset's layout first (``functools.partial(find, CIFAR10)``).
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from tesla_func.data.types import RawArrays, check_labels


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
class CifarLayout:
    """Where one CIFAR variant keeps its batches, and the keys inside them."""

    folder: str  # folder inside the archive
    archive: str  # official archive name
    url: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str


CIFAR10 = CifarLayout(
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test="test_batch",
    meta="batches.meta",
    label_key="labels",
    names_key="label_names",
)
CIFAR100 = CifarLayout(
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    train=("train",),
    test="test",
    meta="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
)


def find(layout: CifarLayout, folder: Path) -> Path | None:
    """The unpacked batch folder in ``folder`` (or ``folder`` itself), else the archive, else
    None."""
    for candidate in (folder / layout.folder, folder):
        if (candidate / layout.train[0]).is_file():
            return candidate
    archive = folder / layout.archive
    return archive if archive.is_file() else None


def read(layout: CifarLayout, path: Path) -> RawArrays:
    """The batches in ``path`` (a folder or the .tar.gz) -> (N, 3, 32, 32) images, labels and the
    class names of the meta file."""
    members = (*layout.train, layout.test, layout.meta)
    blobs = (
        _read_archive(path, layout.folder, members)
        if path.is_file()
        else {m: _read_member_file(path / m) for m in members}
    )
    meta = _unpickle(blobs[layout.meta], f"{path}:{layout.meta}")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout.names_key])
    train = [_cifar_batch(blobs[m], f"{path}:{m}", layout, len(names)) for m in layout.train]
    test_x, test_y = _cifar_batch(blobs[layout.test], f"{path}:{layout.test}", layout, len(names))
    return RawArrays(
        train_x=np.concatenate([x for x, _ in train]),
        train_y=np.concatenate([y for _, y in train]),
        test_x=test_x,
        test_y=test_y,
        class_names=names,
    )


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


def _cifar_batch(data: bytes, where: str, layout: CifarLayout, num_classes: int):
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
    check_labels(y, num_classes, where)
    # Each row is the red plane, then green, then blue, each 32x32 row-major.
    return x.reshape(-1, 3, 32, 32), y

"""Atomic file writes and safetensors files with a JSON header.

A long run must never leave a half-written file behind: everything is written to a temporary file
in the destination folder, flushed, fsynced and then renamed over the target (``os.replace`` is
atomic on POSIX), so a reader sees either the old file or the new one.

Tensors are stored as safetensors (no pickle: a user may download these from someone else); the
non-tensor header (config, provenance, ...) is stored as JSON in the safetensors metadata under the
key ``"header"``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load_bytes
from safetensors.torch import save as _st_save_bytes

_HEADER_KEY = "header"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode an ordinary open() would (0666 - umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]
) -> None:
    """Atomically write ``tensors`` (name -> tensor) and a JSON-able ``header`` as safetensors."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    blob = _st_save_bytes(contiguous, metadata={_HEADER_KEY: json.dumps(dict(header), default=str)})
    atomic_write_bytes(path, blob)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`: (name -> tensor, header).

    Raises ``FileNotFoundError`` naming the path if it is missing and ``ValueError`` naming it if it
    is truncated or not a safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    data = path.read_bytes()
    try:
        tensors = _st_load_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
        header = json.loads(meta.get(_HEADER_KEY, "{}"))
    except (SafetensorError, ValueError, json.JSONDecodeError, OverflowError) as err:
        raise ValueError(
            f"{path} is truncated or not a tesla_func safetensors file ({err}); "
            "delete it and write it again"
        ) from err
    return tensors, header

"""What every command checks before it starts, and how it warns when its result cannot be good.

Set-up checks raise ``ValueError`` with one line that names the fix, before anything is written:
a device this torch cannot use (:func:`check_device`), an output folder that is a file
(:func:`check_output_folder`).

A result that cannot be good (experts at chance, labels collapsed onto a few classes, a student lr
that ran away, images whose norm exploded) does not stop a run: it is warned about once
(:func:`warn`: a :class:`RunWarning`, which Python prints to stderr) and the message is kept in the run's record (the ``warnings`` list of an expert or synthetic-set header
and of ``log.nc``'s attributes), so the files say it too. Each message names the likely fix.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


class RunWarning(UserWarning):
    """A run's result cannot be good; the message says why and what to change."""


def warn(kind: str, message: str, record: dict[str, str], show: bool = True) -> None:
    """Keep ``message`` in ``record`` under ``kind`` and warn with it (a :class:`RunWarning`;
    ``show=False``: only keep it, as ranks other than 0 do), unless ``record`` already holds a
    warning of that kind: each kind is warned of once a run, and a resumed run does not repeat
    what its record holds."""
    if kind in record:
        return
    record[kind] = message
    if show:
        warnings.warn(message, RunWarning, stacklevel=2)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; ValueError naming the fix if it is not one this torch and
    machine can use (CUDA in a CPU-only build, no GPU, a GPU index past the last)."""
    try:
        where = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; use --device cpu or cuda") from err
    if where.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"device {device!r}: this torch ({torch.__version__}) was built "
                             "without CUDA; use --device cpu, or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device {device!r}: torch sees no CUDA GPU on this machine; use "
                             "--device cpu")
        if where.index is not None and where.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA GPU(s), "
                             f"cuda:0 .. cuda:{count - 1}")
    elif where.type != "cpu":
        try:
            torch.empty(0, device=where)
        except (RuntimeError, AssertionError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"device {device!r} cannot be used here ({first}); use --device "
                             "cpu") from err
    return where


def check_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a Path; ValueError if it exists and is not a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder: give a folder (new or one an "
                         "earlier run of the same command wrote)")
    return path

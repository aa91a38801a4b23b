"""The handshake of ``match_trajectory(..., group=...)``: before any work, every rank raises the
same error, or every rank gets the same :class:`Layout` of the steps' rows over the ranks.

Without it, a rank whose call is wrong would raise while the others wait forever in a collective
it never reaches. Two small all-gathers check that the ranks' calls fit together: a rank whose
own arguments are invalid, ranks that disagree on what must be shared (start, target, beta,
method, T, state_stride, keep_graphs, microbatch_size, model, label kind, kind of augmentation;
compared exactly, through float64 checksums, so ranks must hold bit-identical checkpoints), and
steps with no row on any rank. Whether the ranks' augmentations replay the same draws is not
checked: draw them from the same generator state. One process (``group`` None) is the group of
one: its error is raised as it is, and its Layout needs no collective.

The only module of the package that reads the matching's validated arguments
(:mod:`tesla_func.validation`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from tesla_func.distributed.collectives import checksums
from tesla_func.distributed.launch import collective_device
from tesla_func.types import accepts_rows
from tesla_func.validation import Inputs, batch_coupled_layers


def _crc(text: str) -> float:
    return float(zlib.crc32(text.encode()))


def _int(value: float) -> str:
    return str(int(value))


FIELDS: dict[str, object] = {
    # name -> how to show its value in an error message (None: a checksum, not worth showing)
    "T = len(batches)": _int,
    "method": None,  # shown through the registry's names (see _mismatch)
    "state_stride": _int,
    "keep_graphs": _int,
    "microbatch_size": lambda v: "None" if v == 0 else _int(v),
    "beta": lambda v: repr(float(v)),
    "start (sum)": None,
    "start (sum of squares)": None,
    "start (weighted sum)": None,
    "target (sum)": None,
    "target (sum of squares)": None,
    "target (weighted sum)": None,
    "model (its repr)": None,
    "model (BatchNorm layers using batch statistics)": _int,
    "number of classes": _int,
    "label kind": lambda v: "soft (float logits)" if v else "hard (int classes)",
    "dtype": None,
    "image shape": None,
    "augment": lambda v: ("None", "augment(x, step)", "augment(x, step, rows=)")[int(v)],
}
"""The :func:`fingerprint` entries, in the order they are sent."""


def fingerprint(inputs: Inputs, method: int) -> dict[str, float]:
    """What every rank's call must share, as numbers, by the names of :data:`FIELDS`
    (``method``: its position in the registry of methods, -1 if unknown)."""
    start, target = checksums(inputs.start), checksums(inputs.target)
    augment = inputs.augment
    return {
        "T = len(batches)": float(len(inputs.batches)),
        "method": float(method),
        "state_stride": float(inputs.state_stride),
        "keep_graphs": float(inputs.keep_graphs),
        "microbatch_size": float(inputs.microbatch_size or 0),
        "beta": float(inputs.beta),
        "start (sum)": start[0],
        "start (sum of squares)": start[1],
        "start (weighted sum)": start[2],
        "target (sum)": target[0],
        "target (sum of squares)": target[1],
        "target (weighted sum)": target[2],
        "model (its repr)": _crc(repr(inputs.model)),
        "model (BatchNorm layers using batch statistics)": float(
            len(batch_coupled_layers(inputs.model))
        ),
        "number of classes": float(inputs.num_classes),
        "label kind": float(inputs.labels.is_floating_point()),
        "dtype": _crc(str(inputs.images.dtype)),
        "image shape": _crc(str(tuple(inputs.images.shape[1:]))),
        "augment": 0.0 if augment is None else (2.0 if accepts_rows(augment) else 1.0),
    }


@dataclass(frozen=True)
class Layout:
    """Where every step's rows lie: ``counts[r][i]`` rows of step i on rank r, in rank order."""

    rank: int
    counts: tuple[tuple[int, ...], ...]  # (world, T)

    @property
    def world(self) -> int:
        return len(self.counts)

    @property
    def steps(self) -> int:
        """T, the number of steps."""
        return len(self.counts[0])

    def size(self, step: int) -> int:
        """B_i: the rows of step i's minibatch on all ranks."""
        return sum(c[step] for c in self.counts)

    def offset(self, step: int) -> int:
        """o_r: the position of this rank's first row of step i in the step's minibatch."""
        return sum(c[step] for c in self.counts[: self.rank])

    def ranks_holding(self, step: int) -> int:
        return sum(c[step] > 0 for c in self.counts)


def _gather(group: object, row: Tensor, world: int) -> Tensor:
    parts = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(parts, row, group=group)
    return torch.stack(parts)  # (world, len(row))


def matching_handshake(
    group: object | None,
    inputs: Inputs | None,
    method: str | None,
    methods: Sequence[str],
    error: Exception | None,
) -> Layout:
    """Every rank raises the same error, or every rank gets the same Layout.

    ``inputs`` is None exactly when this rank's own validation raised ``error``; ``methods`` are
    the names of the registry of methods. ``group`` None (one process): ``error`` is raised, or
    the Layout of one rank holding every row, without a collective. Otherwise two all-gathers:
    one of a fixed-size float64 vector (an error flag and the :func:`fingerprint`), one of the
    per-step row counts (T int64, once T is known to agree).
    """
    if group is None:
        if error is not None:
            raise error
        return Layout(0, (tuple(len(b) for b in inputs.batches),))
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = collective_device(group)
    names = list(FIELDS)
    if inputs is None:
        values = [1.0] + [0.0] * len(names)
    else:
        index = methods.index(method) if method in methods else -1
        mine = fingerprint(inputs, index)
        assert list(mine) == names
        values = [0.0] + list(mine.values())
    row = torch.nan_to_num(torch.tensor(values, dtype=torch.float64, device=device), nan=-7e300)
    gathered = _gather(group, row, world).cpu()  # (world, 1 + fields)
    flags, table = gathered[:, 0], gathered[:, 1:]
    failed = [r for r in range(world) if flags[r] != 0]
    if failed:
        if error is not None:
            raise error
        raise ValueError(
            f"the arguments of rank(s) {failed} are invalid (the error is raised there); every "
            "rank stops before any work"
        )
    differ = [j for j in range(len(names)) if bool((table[:, j] != table[0, j]).any())]
    if differ:
        raise ValueError(_mismatch(names, differ, table, methods))
    counts = torch.tensor([len(b) for b in inputs.batches], dtype=torch.int64, device=device)
    counts = _gather(group, counts, world).cpu()  # (world, T)
    layout = Layout(rank, tuple(tuple(int(c) for c in r) for r in counts))
    empty = [i for i in range(len(inputs.batches)) if layout.size(i) == 0]
    if empty:
        raise ValueError(
            f"step(s) {empty} have no rows on any rank: every step needs at least one row of "
            "its minibatch on some rank (batches[i] may be empty on some ranks, not on all)"
        )
    return layout


def _mismatch(names: list[str], differ: list[int], table: Tensor, methods: Sequence[str]) -> str:
    """The message for ranks whose shared arguments differ: which, and an example."""
    kinds = list(dict.fromkeys(names[j].split(" (")[0] for j in differ))
    j = differ[0]
    other = next(r for r in range(len(table)) if table[r, j] != table[0, j])
    show = FIELDS[names[j]]
    if names[j] == "method":
        def show(v: float) -> str:
            return repr(methods[int(v)]) if 0 <= v < len(methods) else "an unknown method"
    example = (
        f"{names[j]}: rank 0 has {show(float(table[0, j]))}, rank {other} has "
        f"{show(float(table[other, j]))}"
        if show is not None
        else f"rank 0 and rank {other} hold different {names[j].split(' (')[0]}"
    )
    return (
        f"the ranks' calls do not fit together: they differ in {', '.join(kinds)} ({example}). "
        "Every rank must pass the same start, target, beta, method, number of batches, "
        "state_stride, keep_graphs, microbatch_size, model, label kind and kind of "
        "augmentation; only images, labels and the batches' indices are the rank's own"
    )

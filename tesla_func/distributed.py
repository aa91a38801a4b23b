"""Matching on several processes (``match_trajectory(..., group=...)``): the reductions and the
handshake that make every rank compute one call on the union of their rows.

Each rank holds a shard of the synthetic set and, for every step i, some rows of its minibatch;
the step's minibatch is the concatenation of every rank's rows in rank order (rank r's rows take
positions o_r .. o_r + n_r - 1, o_r = n_0 + ... + n_{r-1}), of size B = sum_r n_r. The inner loss
is the mean over all B rows, so everything of the step splits over ranks exactly as it does over
microbatches (tesla_func.matching, Eqs. M1-M2; docs/reference.md section 10)::

    g_i = sum_r sum_{c on r} grad_theta (n_c / B) l_c          H_i u = sum_r sum_{c on r} H_c u

Only parameter-sized tensors cross ranks: the step gradients g_i and the Hessian-vector products
H_i u, summed by one all-reduce each (:func:`sum_over_ranks`; ``unrolled`` uses the
differentiable :func:`all_reduce_sum`). The images' and labels' gradients J_c^T u stay on the rank
that holds those rows. Every rank therefore walks the same student trajectory, bit for bit, and
returns the same loss and lr gradient. In ``unrolled`` autodiff runs through the all-reduces:
every rank computes the same L and differentiates its share L / W (W ranks); the backward of a
sum all-reduce sums the ranks' cotangents, which gives each rank dL/dX of its own rows, and its
share of dL/dbeta (beta is held by every rank), summed over the ranks at the end.

Before any work, :func:`agree` checks in two small collectives that the ranks' calls fit
together, and raises the same error on every rank if not (so no rank waits forever in a
collective the others never reach): a rank whose own arguments are invalid, ranks that disagree on
what must be shared (start, target, lr, method, T, state_stride, keep_graphs, microbatch_size,
model, label kind, kind of augmentation; compared exactly, through float64 checksums, so ranks
must hold bit-identical checkpoints), and steps with no row on any rank. Whether the ranks'
augmentations replay the same draws is not checked: draw them from the same generator state.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from tesla_func.types import Params, accepts_rows
from tesla_func.validation import Inputs, batch_coupled_layers


class _AllReduceSum(torch.autograd.Function):
    """x -> sum of x over the ranks of ``group``. A sum is linear, so its backward is the same sum
    of the cotangents, itself differentiable: any order of derivatives works, under autograd and
    under torch.func transforms (``setup_context`` form, with a ``vmap`` rule)."""

    @staticmethod
    def forward(x: Tensor, group: object) -> Tensor:
        out = x.clone()  # all_reduce writes in place; the input stays untouched
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad_output, ctx.group), None

    @staticmethod
    def vmap(info, in_dims, x: Tensor, group: object) -> tuple[Tensor, int | None]:
        # The sum is elementwise: reduce the whole batch at once (every rank vmaps alike).
        if in_dims[0] is None:
            return _AllReduceSum.apply(x, group), None
        return _AllReduceSum.apply(x.movedim(in_dims[0], 0), group), 0


def all_reduce_sum(x: Tensor, group: object) -> Tensor:
    """Differentiable sum of ``x`` over the ranks of ``group`` (every rank gets the sum)."""
    return _AllReduceSum.apply(x, group)


def _flat(values: tuple[Params, ...]) -> Tensor:
    return torch.cat([v.reshape(-1) for d in values for v in d.values()])  # (sum of sizes,)


def _unflat(flat: Tensor, like: tuple[Params, ...]) -> tuple[Params, ...]:
    out, at = [], 0
    for d in like:
        part = {}
        for k, v in d.items():
            part[k] = flat[at : at + v.numel()].view_as(v)
            at += v.numel()
        out.append(part)
    return tuple(out)


def sum_over_ranks(group: object, *values: Params) -> tuple[Params, ...]:
    """Each parameter dict summed over the ranks, all in one all-reduce (no graph)."""
    with torch.no_grad():
        flat = _flat(values)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return _unflat(flat, values)


def sum_over_ranks_differentiable(group: object, value: Params) -> Params:
    """A parameter dict summed over the ranks in one all-reduce that autodiff goes through."""
    (out,) = _unflat(all_reduce_sum(_flat((value,)), group), (value,))
    return out


def check_group(group: object) -> tuple[int, int]:
    """(this process's rank in ``group``, the group's size), or a clear error."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) on every rank first and pass "
            "group=torch.distributed.group.WORLD (or a new_group), or pass group=None for a "
            "call on one process"
        )
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group gives a non-member
        raise ValueError("this process is not a member of group: call with a group it is in")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD), got {type(group).__name__}"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group: call with a group it is in")
    return rank, dist.get_world_size(group)


def world_size(group: object) -> int:
    return dist.get_world_size(group)


def _device(group: object) -> torch.device:
    """Where the handshake's small tensors live: NCCL moves only CUDA tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _checksums(params: Mapping[str, Tensor]) -> tuple[float, float, float]:
    """Sum, sum of squares and a position-weighted sum, in float64: equal on ranks that hold the
    same tensors (the same reduction of the same bits), different for almost any difference."""
    s1 = s2 = s3 = 0.0
    for v in params.values():
        x = v.detach().reshape(-1).to(torch.float64)
        weights = torch.linspace(-1.0, 1.0, x.numel(), dtype=torch.float64, device=x.device)
        s1 += float(x.sum())
        s2 += float(x.square().sum())
        s3 += float((x * weights).sum())
    return s1, s2, s3


def _crc(text: str) -> float:
    return float(zlib.crc32(text.encode()))


def _int(value: float) -> str:
    return str(int(value))


FIELDS: dict[str, object] = {
    # name -> how to show its value in an error message (None: a checksum, not worth showing)
    "T = len(batches)": _int,
    "method": None,  # shown through the registry's names (see agree)
    "state_stride": _int,
    "keep_graphs": _int,
    "microbatch_size": lambda v: "None" if v == 0 else _int(v),
    "lr": lambda v: repr(float(v)),
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
    start, target = _checksums(inputs.start), _checksums(inputs.target)
    augment = inputs.augment
    return {
        "T = len(batches)": float(len(inputs.batches)),
        "method": float(method),
        "state_stride": float(inputs.state_stride),
        "keep_graphs": float(inputs.keep_graphs),
        "microbatch_size": float(inputs.microbatch_size or 0),
        "lr": float(inputs.lr),
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


def agree(
    group: object,
    inputs: Inputs | None,
    method: str | None,
    methods: Sequence[str],
    error: Exception | None,
) -> Layout:
    """The handshake: every rank raises the same error, or every rank gets the same Layout.

    Two all-gathers: one of a fixed-size float64 vector (an error flag and the
    :func:`fingerprint`), one of the per-step row counts (T int64, once T is known to agree).
    ``inputs`` is None exactly when this rank's own validation raised ``error``; ``methods`` are
    the names of the registry of methods.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = _device(group)
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
        "Every rank must pass the same start, target, lr, method, number of batches, "
        "state_stride, keep_graphs, microbatch_size, model, label kind and kind of "
        "augmentation; only images, labels and the batches' indices are the rank's own"
    )

"""Work on several processes (torch.distributed): matching, distillation, experts, evaluation.

The first part is matching (``match_trajectory(..., group=...)``): the reductions and the
handshake that make every rank compute one call on the union of their rows. The second part
(below the matching code) shards a distillation run, spreads experts and evaluation models over
the ranks, makes every rank raise the same error on a bad set-up, and reads a torchrun launch.

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

import builtins
import contextlib
import datetime
import math
import os
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------
# Distillation, experts and evaluation on several processes, and the torchrun launch.
#
# ``Distiller(cfg, out, group=...)`` shards the synthetic set: rank r holds a contiguous block of
# the class-major rows (:class:`Shards`) of the images, the label logits and their momenta; log
# beta, the generator and the logs are replicated. Every rank draws the same minibatch indices
# and DSA parameters from the same generator and keeps its own rows (:func:`local_minibatches`),
# so a run on W ranks computes what one process computes, up to the order of float sums.
# ``train_experts(..., group=...)`` trains expert i on rank i % W; ``evaluate(..., group=...)``
# trains model k on rank k % W and sums the accuracies over the ranks (:func:`spread`).


@dataclass(frozen=True)
class Shards:
    """The rows of a set of ``n`` rows in contiguous blocks over ``world`` ranks: rank r holds
    rows [start(r), start(r) + sizes[r]), sizes[r] = n // W + (1 if r < n % W else 0).

    A synthetic set is class-major (``ipc`` rows of class 0, then class 1, ...), so each rank
    holds whole classes where W divides the number of classes."""

    n: int
    world: int

    def __post_init__(self) -> None:
        if self.world > self.n:
            raise ValueError(
                f"{self.world} ranks for a synthetic set of {self.n} images: every rank needs at "
                f"least one image; run on at most {self.n} ranks or raise ipc"
            )

    @property
    def sizes(self) -> tuple[int, ...]:
        base, extra = divmod(self.n, self.world)
        return tuple(base + (r < extra) for r in range(self.world))

    def start(self, rank: int) -> int:
        return sum(self.sizes[:rank])

    def rows(self, rank: int) -> slice:
        """Rank ``rank``'s rows of the whole set."""
        return slice(self.start(rank), self.start(rank) + self.sizes[rank])

    def owner(self, index: Tensor) -> Tensor:
        """(B,) the rank holding each of the rows ``index`` (B,) of the whole set."""
        ends = torch.tensor([self.start(r + 1) for r in range(self.world)], device=index.device)
        return torch.bucketize(index, ends, right=True)


class RankOrderAugment:
    """Replays a minibatch's augmentation when the minibatch is laid out in rank order.

    ``match_trajectory(..., group=...)`` sees step i's minibatch as every rank's rows in rank
    order, while its transforms were drawn (every rank alike) for the rows in the order the
    minibatch was drawn. ``order[i][j]`` is the drawn position of the row at rank-order position
    j, so each row gets the transform it gets in one process: ``augment(x, step, rows=rows)``
    applies the drawn transforms of positions ``order[step][rows]``.
    """

    def __init__(self, augment: object, order: tuple[Tensor, ...]) -> None:
        self.augment, self.order = augment, order  # T tensors (B_i,)

    def __call__(self, x: Tensor, step: int, *, rows: Tensor | None = None) -> Tensor:
        order = self.order[step]
        return self.augment(x, step, rows=order if rows is None else order[rows.to(order.device)])

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(len(o) for o in self.order)


def local_minibatches(
    shards: Shards, rank: int, batches: Sequence[Tensor], augment: object | None
) -> tuple[list[Tensor], RankOrderAugment | None]:
    """This rank's rows of every minibatch of the whole set, as indices into its shard, in the
    order they were drawn; and ``augment`` (drawn for the whole minibatches, a RowAugment such as
    ReplayedDSA) re-addressed to the rank order of ``match_trajectory(..., group=...)``."""
    start, local, order = shards.start(rank), [], []
    for batch in batches:  # (B,) indices into the whole set
        owner = shards.owner(batch)
        local.append(batch[owner == rank] - start)
        order.append(torch.sort(owner, stable=True).indices)  # rank order -> drawn position
    if augment is None:
        return local, None
    if not accepts_rows(augment):
        raise TypeError("augment must accept rows= (ReplayedDSA does) to be split over ranks")
    return local, RankOrderAugment(augment, tuple(order))


def check_backend(group: object, device: torch.device) -> None:
    """NCCL moves CUDA tensors only: refuse a CPU run on an NCCL group (same answer on every
    rank, no collective)."""
    if dist.get_backend(group) == "nccl" and torch.device(device).type != "cuda":
        raise ValueError(
            f"the process group uses NCCL, which moves CUDA tensors only, but the work runs on "
            f"{device}: use a gloo group for cpu (torchrun and the command line choose gloo for "
            "cpu and nccl for cuda)"
        )


def sum_floats(group: object, values: Sequence[float]) -> list[float]:
    """Python floats summed over the ranks in one float64 all-reduce."""
    flat = torch.tensor(list(values), dtype=torch.float64, device=_device(group))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return flat.cpu().tolist()


def max_float(group: object, value: float) -> float:
    flat = torch.tensor([value], dtype=torch.float64, device=_device(group))
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    return float(flat)


def barrier(group: object) -> None:
    dist.barrier(group=group)


def gather_rows(shard: Tensor, shards: Shards, group: object, *, everyone: bool) -> Tensor | None:
    """The whole set (n, ...) from every rank's ``shard`` (sizes[r], ...), on the CPU.

    ``everyone``: every rank gets it (one broadcast per rank); else rank 0 only (the others send
    to it; they get None). Shards move one at a time, so a device holds at most one other rank's
    shard beyond its own (NCCL moves CUDA tensors; the result is copied to the CPU piece by
    piece).
    """
    rank = dist.get_rank(group)
    shard = shard.detach().contiguous()
    parts = []
    for r, size in enumerate(shards.sizes):
        source = dist.get_global_rank(group, r)
        if everyone:
            part = shard if r == rank else shard.new_empty((size, *shard.shape[1:]))
            dist.broadcast(part, src=source, group=group)
            parts.append(part.cpu())
        elif r == 0:
            parts.append(shard.cpu() if rank == 0 else None)
        elif rank == r:
            dist.send(shard, dst=dist.get_global_rank(group, 0), group=group)
        elif rank == 0:
            part = shard.new_empty((size, *shard.shape[1:]))
            dist.recv(part, src=source, group=group)
            parts.append(part.cpu())
    return torch.cat(parts) if everyone or rank == 0 else None


class SetRanks:
    """The processes sharing a synthetic set of ``n`` rows, as the distillation sees them.

    One process (``group`` None) holds every row; over a process group rank r holds the
    :class:`Shards` block r. Every method answers for one process too (the identity, or nothing
    to do), so the distillation reads the same either way.
    """

    def __init__(self, n: int, group: object | None = None) -> None:
        self.n, self.group = n, group
        self.rank = 0 if group is None else dist.get_rank(group)
        self.shards = None if group is None else Shards(n, world_size(group))

    @property
    def rows(self) -> slice | None:
        """This rank's rows of the set (None: one process, all of them)."""
        return None if self.shards is None else self.shards.rows(self.rank)

    def local_minibatches(
        self, batches: Sequence[Tensor], augment: object | None
    ) -> tuple[list[Tensor], object | None]:
        """This rank's rows of the minibatches every rank drew (:func:`local_minibatches`)."""
        if self.group is None:
            return list(batches), augment
        return local_minibatches(self.shards, self.rank, batches, augment)

    def whole(self, rows: Tensor) -> Tensor:
        """The whole set's (n, ...) from this rank's rows, on every rank."""
        if self.group is None:
            return rows.detach()
        return gather_rows(rows, self.shards, self.group, everyone=True)

    def to_first(self, rows: Tensor) -> Tensor | None:
        """The whole set's (n, ...) on rank 0 (None elsewhere), from this rank's rows."""
        if self.group is None:
            return rows.detach()
        return gather_rows(rows, self.shards, self.group, everyone=False)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Python floats summed over the ranks."""
        return list(values) if self.group is None else sum_floats(self.group, values)

    def norm(self, rows: Tensor) -> float:
        """||whole-set tensor|| from this rank's rows."""
        if self.group is None:
            return float(rows.norm())
        return math.sqrt(self.sum([float(rows.double().square().sum())])[0])

    def agree(self, ok: bool) -> bool:
        """``ok`` on every rank: all ranks go on, or all skip."""
        return ok if self.group is None else self.sum([float(not ok)])[0] == 0

    def barrier(self) -> None:
        if self.group is not None:
            barrier(self.group)


def spread(count: int, group: object) -> list[int]:
    """The items of ``range(count)`` this rank takes: i with i % W == rank (experts, evaluation
    models), so item i does the same work whatever the number of ranks."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return list(range(rank, count, world))


def checksum(tensor: Tensor) -> str:
    """A float64 fingerprint of a tensor's values (its shape, sum, sum of squares and a
    position-weighted sum): equal on ranks that hold the same values, different for almost any
    difference."""
    if tensor.numel() == 0:
        return f"{tuple(tensor.shape)}"
    return f"{tuple(tensor.shape)} {_checksums({'x': tensor})}"


def raise_together(
    group: object, error: BaseException | None, fingerprint: Mapping[str, str] | None
) -> None:
    """The set-up handshake: every rank raises when any rank failed or the ranks disagree.

    Call it on every rank after the rank's own set-up, with the exception the set-up raised
    (None if it went well) and, where it went well, a fingerprint (name -> text) of what every
    rank must share. One ``all_gather_object``. When every rank failed with the same message, each
    raises its own error; when some failed, every rank raises the first failing rank's error (its
    type where it is a built-in exception, else RuntimeError) naming the failing ranks; when the
    fingerprints differ, every rank raises a ValueError naming the first difference.
    """
    world = dist.get_world_size(group)
    mine = None if error is None else (type(error).__name__, _message(error))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (mine, None if error else dict(fingerprint or {})),
                           group=group)
    failed = [r for r, (e, _) in enumerate(gathered) if e is not None]
    if failed:
        name, text = gathered[failed[0]][0]
        if len(failed) == world and all(gathered[r][0][1] == text for r in failed):
            raise error
        kind = getattr(builtins, name, None)
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = RuntimeError
        raise kind(f"{text} [raised on rank(s) {failed} of {world}; every rank stops before any "
                   "work]") from error
    prints = [f for _, f in gathered]
    for key in prints[0]:
        other = next((r for r in range(world) if prints[r].get(key) != prints[0][key]), None)
        if other is not None:
            raise ValueError(
                f"the ranks do not agree on {key}: rank 0 has {prints[0][key]!r}, rank {other} "
                f"has {prints[other].get(key)!r}. {_advice(key)}"
            )


@contextlib.contextmanager
def together(
    group: object | None, fingerprint: Callable[[], Mapping[str, str]] | None = None
) -> Iterator[None]:
    """Run a block of set-up on every rank, then :func:`raise_together`: an exception in the
    block on any rank is raised on every rank, and (when none raised) ``fingerprint()``, called
    after the block, must agree. ``group`` None: the block runs as it is."""
    if group is None:
        yield
        return
    error = None
    try:
        yield
    except Exception as caught:  # noqa: BLE001 -- raised on every rank just below
        error = caught
    raise_together(group, error, None if error or fingerprint is None else fingerprint())


def _message(error: BaseException) -> str:
    return error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)


_ADVICE = {
    "the checkpoint": "Every rank must see the same output folder (one folder shared by all "
    "nodes): rank 0 writes the checkpoint and every rank resumes from it.",
}


def _advice(key: str) -> str:
    return _ADVICE.get(key, "Every rank must run the same config on the same data: launch them "
                       "with the same command line.")


def wait_for_files(paths: Sequence[Path], folder: Path, stall_s: float, poll_s: float = 0.5,
                   ) -> None:
    """Wait until every file of ``paths`` exists, while ``folder`` keeps changing.

    Ranks that train different experts finish at different times, longer apart than a
    collective's timeout may allow; the files they write (an expert file, or an epoch checkpoint
    under ``folder``) show that they are alive. Raises TimeoutError when nothing under
    ``folder`` changed for ``stall_s`` seconds and files are still missing: a rank failed, or the
    folder is not shared between the ranks' machines.
    """

    def newest() -> float:
        return max((p.stat().st_mtime for p in folder.rglob("*.safetensors")), default=0.0)

    last, seen = time.monotonic(), newest()
    while True:
        missing = [p for p in paths if not p.exists()]
        if not missing:
            return
        now = newest()
        if now != seen:
            seen, last = now, time.monotonic()
        elif time.monotonic() - last > stall_s:
            raise TimeoutError(
                f"{len(missing)} expert file(s) never appeared ({missing[0].name}, ...) and "
                f"nothing under {folder} changed for {stall_s:.0f} s: a rank failed, or {folder} "
                "is not one folder shared by every rank"
            )
        time.sleep(poll_s)


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets for every process (among others) and the launch reads."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch."""

    rank: int
    world: int
    local_rank: int  # its index on its node: the CUDA device it uses


def launch_from_env(environ: Mapping[str, str]) -> Launch | None:
    """The torchrun launch described by ``environ``, None when none of its variables is set.

    Raises ValueError naming the variables when only some are set, or their values do not fit
    together (so every rank of a broken launch stops with the same message, before any work).
    """
    given = {k: environ[k] for k in TORCHRUN_VARIABLES if environ.get(k, "") != ""}
    if not given:
        return None
    missing = [k for k in TORCHRUN_VARIABLES if k not in given]
    if missing:
        shown = ", ".join(f"{k}={v}" for k, v in given.items())
        raise ValueError(
            f"the torchrun environment is only partly set ({shown}; missing: "
            f"{', '.join(missing)}): launch with `torchrun --nproc_per_node=N -m tesla_func.cli "
            f"...`, which sets them all, or unset {', '.join(given)} to run one process"
        )
    try:
        rank, world, local = (int(given[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        int(given["MASTER_PORT"])
    except ValueError as err:
        raise ValueError(f"RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers, "
                         f"got {given}") from err
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"need WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got "
                         f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return Launch(rank, world, local)


def backend_for(device: str | torch.device) -> str:
    """gloo for cpu, nccl for cuda (the backends torch.distributed offers for each)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return "gloo"
    if kind == "cuda":
        return "nccl"
    raise ValueError(f"distributed runs support device cpu (gloo) and cuda (nccl), got {device}")


@contextlib.contextmanager
def torchrun_group(
    device: str | torch.device, timeout_s: float, environ: Mapping[str, str] | None = None
) -> Iterator[object | None]:
    """The process group of a torchrun launch (read from the environment), or None for one
    process; destroyed on exit.

    The backend follows ``device``: gloo for cpu, nccl for cuda, where the process uses CUDA
    device ``LOCAL_RANK`` (so ``device="cuda"`` means its own GPU). Every collective of the group
    fails after ``timeout_s`` seconds instead of waiting forever. A torch.distributed already
    initialised (by the caller) is used as it is and left alone.
    """
    launch = launch_from_env(os.environ if environ is None else environ)
    if launch is None:
        yield None
        return
    backend = backend_for(device)
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    if backend == "nccl":
        if not torch.cuda.is_available() or launch.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"device {device} on LOCAL_RANK {launch.local_rank} needs CUDA device "
                f"{launch.local_rank}, but this node has {torch.cuda.device_count()}: launch at "
                "most that many processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(
        backend, init_method="env://", rank=launch.rank, world_size=launch.world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()

"""Who holds which rows: the synthetic set sharded over the ranks, each rank's rows of the
minibatches every rank draws, and items (experts, evaluation models) spread over the ranks.

``Distiller(cfg, out, group=...)`` shards the synthetic set: rank r holds a contiguous block of
the class-major rows (:class:`Shards`) of the images, the label logits and their momenta; log
beta, the generator and the logs are replicated. Every rank draws the same minibatch indices
and DSA parameters from the same generator and keeps its own rows (:func:`local_minibatches`),
so a run on W ranks computes what one process computes, up to the order of float sums.
``train_experts(..., group=...)`` trains expert i on rank i % W; ``evaluate(..., group=...)``
trains model k on rank k % W and sums the accuracies over the ranks (:func:`spread`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from tesla_func.distributed.collectives import barrier, sum_floats, world_size
from tesla_func.types import accepts_rows


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

    def shard(self, rank: int) -> slice:
        """Rank ``rank``'s shard: its block of rows of the whole set."""
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


def gather_rows(local: Tensor, shards: Shards, group: object, *, everyone: bool) -> Tensor | None:
    """The whole set (n, ...) from every rank's ``local`` tensor of its shard (sizes[r], ...), on
    the CPU.

    ``everyone``: every rank gets it (one broadcast per rank); else rank 0 only (the others send
    to it; they get None). Shards move one at a time, so a device holds at most one other rank's
    shard beyond its own (NCCL moves CUDA tensors; the result is copied to the CPU piece by
    piece).
    """
    rank = dist.get_rank(group)
    local = local.detach().contiguous()
    parts = []
    for r, size in enumerate(shards.sizes):
        source = dist.get_global_rank(group, r)
        if everyone:
            part = local if r == rank else local.new_empty((size, *local.shape[1:]))
            dist.broadcast(part, src=source, group=group)
            parts.append(part.cpu())
        elif r == 0:
            parts.append(local.cpu() if rank == 0 else None)
        elif rank == r:
            dist.send(local, dst=dist.get_global_rank(group, 0), group=group)
        elif rank == 0:
            part = local.new_empty((size, *local.shape[1:]))
            dist.recv(part, src=source, group=group)
            parts.append(part.cpu())
    return torch.cat(parts) if everyone or rank == 0 else None


class SetRanks:
    """The processes sharing a synthetic set of ``n`` rows, as the distillation sees them.

    One process (``group`` None) holds every row; over a process group rank r holds the
    :class:`Shards` block r. Every method answers for one process too (the identity, or nothing
    to do), so the distillation reads the same either way. ``local`` arguments are tensors of
    this rank's shard (N_r, ...).
    """

    def __init__(self, n: int, group: object | None = None) -> None:
        self.n, self.group = n, group
        self.rank = 0 if group is None else dist.get_rank(group)
        self.shards = None if group is None else Shards(n, world_size(group))

    @property
    def shard(self) -> slice | None:
        """This rank's shard of the set (None: one process, all rows)."""
        return None if self.shards is None else self.shards.shard(self.rank)

    def local_minibatches(
        self, batches: Sequence[Tensor], augment: object | None
    ) -> tuple[list[Tensor], object | None]:
        """This rank's rows of the minibatches every rank drew (:func:`local_minibatches`)."""
        if self.group is None:
            return list(batches), augment
        return local_minibatches(self.shards, self.rank, batches, augment)

    def whole(self, local: Tensor) -> Tensor:
        """The whole set's (n, ...) from this rank's shard, on every rank."""
        if self.group is None:
            return local.detach()
        return gather_rows(local, self.shards, self.group, everyone=True)

    def to_first(self, local: Tensor) -> Tensor | None:
        """The whole set's (n, ...) on rank 0 (None elsewhere), from this rank's shard."""
        if self.group is None:
            return local.detach()
        return gather_rows(local, self.shards, self.group, everyone=False)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Python floats summed over the ranks."""
        return list(values) if self.group is None else sum_floats(self.group, values)

    def norm(self, local: Tensor) -> float:
        """||whole-set tensor|| from this rank's shard."""
        if self.group is None:
            return float(local.norm())
        return math.sqrt(self.sum([float(local.double().square().sum())])[0])

    def all_true(self, ok: bool) -> bool:
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

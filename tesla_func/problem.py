"""The matching problem every gradient method shares: validated inputs, and one inner step.

:func:`make_problem` validates the arguments of :func:`tesla_func.matching.match_trajectory`
(:mod:`tesla_func.validation`) and bundles them as a :class:`Problem`, which knows how to take
a student step (its gradient g_i, as a value or with the graph that the methods pull back
through) and nothing about which gradient of the trajectory loss is wanted: that is the job
of the methods in :mod:`tesla_func.matching`. Notation: proofs/README.md.

Microbatches (``microbatch_size = m``, every method): the inner loss is a mean over the step's B
rows, so it splits exactly over consecutive chunks c of at most m rows (n_c rows each; docs/
reference.md section 10)::

    l_i = sum_c (n_c / B) l_c,   g_i = sum_c grad_theta (n_c / B) l_c                       (M1)
    u^T dg_i/d(theta, X, Y) = sum_c u^T d[grad_theta (n_c / B) l_c]/d(theta, X, Y)        (M2)

with l_c the mean loss over chunk c. ``tesla`` and ``exact`` build, pull back and free one chunk
graph at a time, so their peak is about one chunk's graph (kept steps keep all their chunks';
``keep_graphs`` counts steps); ``unrolled`` still keeps every chunk of every step. Layers that mix
rows (train-mode BatchNorm) break (M1): splitting them is refused. The augmentation is called per
chunk with the positions of the chunk's rows in the step's minibatch (``augment(x, step,
rows=...)``, :class:`tesla_func.types.RowAugment`), so every row gets the transform drawn for it.

Several processes (``group``, a ``torch.distributed`` process group; tesla_func/distributed/):
each rank holds a shard of X (and Y) and its rows of every step, which may be none; step i's
minibatch is every rank's rows in rank order, and (M1)-(M2) split it over ranks as over chunks
(each rank's chunks weighted by n_c / B with B counted over all ranks; microbatches split each
rank's rows further). The step gradients g_i and the products H_i u are all-reduced, so every rank
walks the same trajectory and returns the same L and dL/dbeta; J_c^T u stays on the rank that
holds the rows. A handshake before any work makes bad input raise on every rank.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp

from tesla_func import distributed
from tesla_func.types import Params, RowAugment, StepAugment
from tesla_func.validation import Inputs, check_inputs, check_split

Step = tuple[int, Params, Params, Params]  # (i, theta_i, g_i, theta_{i+1})


class Chunk(NamedTuple):
    """Rows of one step's minibatch that go through the network together (a microbatch).

    index:  (n,) int64 indices into the images (and labels) of this call
    rows:   (n,) int64 positions of these rows in the step's whole minibatch, which the
            augmentation needs to replay their transforms; None when the chunk *is* the whole
            minibatch (the augmentation is then called as ``augment(x, step)``)
    weight: n / B, the chunk's share of the step's mean loss (B = rows of the whole minibatch)
    """

    index: Tensor
    rows: Tensor | None
    weight: float


# ----------------------------------------------------------------------------------------------
# Small pytree helpers on name -> tensor dicts. Parameter dicts hold a handful of tensors, so plain
# comprehensions cost nothing next to one convolution and keep every line readable.


def axpy(alpha: Tensor | float, x: Params, y: Params) -> Params:
    """y + alpha * x, key by key."""
    return {k: y[k] + alpha * x[k] for k in y}


def tree_sub(x: Params, y: Params) -> Params:
    return {k: x[k] - y[k] for k in x}


def tree_dot(x: Params, y: Params) -> Tensor:
    return sum((x[k] * y[k]).sum() for k in x)


def sq_norm(x: Params) -> Tensor:
    return tree_dot(x, x)


def tree_add(total: Params | None, x: Params | None) -> Params | None:
    """total + x, where None is an empty sum (a step with no chunks, or no H u asked for)."""
    if total is None or x is None:
        return x if total is None else total
    return {k: total[k] + x[k] for k in total}


def pull_once(pullback: Callable, cotangent: object) -> tuple:
    """Apply a ``torch.func.vjp`` pullback for the first and only time.

    ``retain_graph=False`` frees the graph node by node as the backward pass goes, and
    ``create_graph=False`` records no graph of the backward pass itself (no one differentiates
    these gradients again: results are detached). torch.func's defaults do both, and ``grad``
    cannot be told otherwise: written with ``grad_and_value``, ``unrolled`` peaked at 846 MiB
    instead of 396 MiB at T = 5 (ConvNet-3 width 32, 100 images) and took 1.15x the time.
    """
    return pullback(cotangent, retain_graph=False, create_graph=False)


class DataGrads:
    """Running sums of dL/dX and dL/dY over the chunks' vjps (Y only for soft labels)."""

    def __init__(self, images: Tensor, labels: Tensor | None) -> None:
        self.images, self.labels = images, labels  # (N, C, H, W), (N, K) or None

    @classmethod
    def zeros(cls, p: Problem) -> DataGrads:
        return cls(
            torch.zeros_like(p.images), torch.zeros_like(p.labels) if p.soft_labels else None
        )

    def add(self, index: Tensor, images: Tensor, labels: Tensor | None) -> None:
        """Add one chunk's u^T dg/dx (n, C, H, W) (and u^T dg/dy (n, K)) at its rows ``index``."""
        with torch.no_grad():
            self.images.index_add_(0, index, images)
            if self.labels is not None:
                self.labels.index_add_(0, index, labels)


ChunkPullback = Callable[[Params, DataGrads], "Params | None"]


# ----------------------------------------------------------------------------------------------
# The problem: validated inputs and the one inner step every method shares.


@dataclass(frozen=True)
class Problem:
    """Validated inputs of one matching call. Build it with :func:`make_problem`."""

    model: nn.Module
    buffers: Params  # the model's buffers (read only: see validation.batch_statistics_only)
    start: Params  # theta_0 = theta*_t
    target: Params  # theta*_{t+M}
    images: Tensor  # (N, C, H, W)
    labels: Tensor  # (N,) int64 class indices, or (N, K) float label logits
    beta: Tensor  # () the student learning rate beta > 0
    batches: tuple[Tensor, ...]  # T index tensors (B_i,) into images
    augment: StepAugment | RowAugment | None
    state_stride: int  # exact: keep every s-th student state, recompute the others
    keep_graphs: int  # tesla, exact: the last k steps keep their pass-1 graphs (k <= T)
    chunks: tuple[tuple[Chunk, ...], ...]  # per step, this rank's rows in microbatches (Eq. M1)
    group: object | None  # the torch.distributed process group; None: one process

    @property
    def steps(self) -> int:
        return len(self.batches)

    @property
    def soft_labels(self) -> bool:
        return self.labels.is_floating_point()

    @property
    def world_size(self) -> int:
        """W, the number of processes that share the call (1 without a group)."""
        return 1 if self.group is None else distributed.world_size(self.group)

    @property
    def denominator(self) -> Tensor:
        """D = ||start - target||^2, a constant of the expert trajectory."""
        return sq_norm(tree_sub(self.start, self.target))

    def chunk_loss(
        self, params: Params, x: Tensor, y: Tensor, step: int, chunk: Chunk
    ) -> Tensor:
        """w_c l_c: the chunk's share of l(theta; A_i(X[b_i]), Y[b_i]) (Eq. M1).

        ``x`` (n, C, H, W) and ``y`` (n,) or (n, K) are the chunk's rows, X[index] and Y[index].
        l_c is the mean cross-entropy of the student on them; soft labels are logits: the target
        is softmax(y) and the loss -sum_k softmax(y)_k log softmax(f(x))_k.
        """
        if self.augment is not None:
            x = self.augment(x, step) if chunk.rows is None else self.augment(
                x, step, rows=chunk.rows
            )
        logits = functional_call(self.model, (params, self.buffers), (x,), strict=True)  # (n, K)
        target = F.softmax(y, dim=-1) if self.soft_labels else y
        loss = F.cross_entropy(logits, target)
        return loss if chunk.weight == 1.0 else loss * chunk.weight

    def across_ranks(self, *values: Params | None) -> tuple[Params, ...]:
        """Parameter-shaped values summed over the ranks, in one all-reduce (None: nothing on
        this rank). The only tensors that cross ranks. One process: returned as they are."""
        if self.group is None:
            return values
        filled = tuple(
            {k: torch.zeros_like(v) for k, v in self.start.items()} if x is None else x
            for x in values
        )  # a rank without rows of a step adds zeros
        return distributed.sum_over_ranks(self.group, *filled)

    def descend(self, params: Params, beta: Tensor, g: Params | None) -> Params:
        """theta_{i+1} = theta_i - beta g_i from this rank's share g of g_i, differentiable.

        On several ranks the update beta g is summed over them by a differentiable all-reduce
        (its backward sums the cotangents: see :func:`unrolled`). It sums beta g, not g, and a
        rank without rows sends 0 * theta_i, so that every rank's update is in the graph (it
        depends on beta) and its all-reduce's backward runs on every rank, in the same order:
        step T-1's first, as each step's cotangent needs the later steps' (through theta).
        """
        if self.group is None:
            return axpy(-beta, g, params)
        share = {k: beta * (v * 0 if g is None else g[k]) for k, v in params.items()}
        return tree_sub(params, distributed.sum_over_ranks_differentiable(self.group, share))

    def step_grad(self, params: Params, images: Tensor, labels: Tensor, step: int) -> Params | None:
        """This rank's share of g_i, sum_c grad_theta w_c l_c over its chunks (Eq. M1): all of
        g_i on one process. Differentiable in all inputs (``unrolled``); None without chunks.

        ``images``/``labels`` are the full synthetic set, so that differentiating through the
        indexing returns gradients of full shape.
        """
        total = None
        for chunk in self.chunks[step]:
            x, y = images[chunk.index], labels[chunk.index]
            total = tree_add(total, grad(self.chunk_loss)(params, x, y, step, chunk))
        return total

    def step_grad_value(self, params: Params, step: int) -> Params:
        """g_i as a plain value (no graph), for the passes that only need the student's states.

        The same number as :meth:`step_grad`, chunk by chunk from one ``vjp`` of the chunk's loss
        pulled back without a graph (:func:`pull_once`). ``grad`` always builds the graph of its
        backward pass, with twice-differentiable composite kernels (GroupNorm's backward costs
        several times its fused kernel): 1.2x the time of this step.
        """
        total = None
        for chunk in self.chunks[step]:
            total = tree_add(total, self.chunk_grad_value(params, step, chunk))
        return self.across_ranks(total)[0]

    def chunk_grad_value(self, params: Params, step: int, chunk: Chunk) -> Params:
        """g_c = grad_theta w_c l_c as a plain value, from one vjp of the chunk's loss."""
        x, y = self.images[chunk.index], self.labels[chunk.index]
        loss, pullback = vjp(lambda theta: self.chunk_loss(theta, x, y, step, chunk), params)
        return pull_once(pullback, torch.ones_like(loss))[0]

    def chunk_vjp(
        self, params: Params, step: int, chunk: Chunk, *, wrt_params: bool
    ) -> tuple[Params, ChunkPullback]:
        """g_c = grad_theta w_c l_c and its pullback over (theta if ``wrt_params``, x, y if soft).

        One ``vjp`` call over the chunk's rows x = X[index] (and y = Y[index]). The pullback maps a
        cotangent u (a parameter dict) and the running data gradients to u^T dg_c/dtheta (the
        Hessian-vector product H_c u; None unless ``wrt_params``), after adding u^T dg_c/dx
        (and u^T dg_c/dy) into the data gradients at the chunk's rows. It holds the chunk's graph,
        frees it as it runs (:func:`pull_once`), and can be applied only once.
        """
        soft = self.soft_labels
        x, y = self.images[chunk.index], self.labels[chunk.index]

        def g_of(*primals: Tensor | Params) -> Params:
            theta, rest = (primals[0], primals[1:]) if wrt_params else (params, primals)
            return grad(self.chunk_loss)(theta, rest[0], rest[1] if soft else y, step, chunk)

        primals = (*((params,) if wrt_params else ()), x, *((y,) if soft else ()))
        g, pullback = vjp(g_of, *primals)

        def pull(cotangent: Params, grads: DataGrads) -> Params | None:
            out = list(pull_once(pullback, cotangent))
            hvp = out.pop(0) if wrt_params else None
            grads.add(chunk.index, out[0], out[1] if soft else None)
            return hvp

        return g, pull

    def pull_chunks(
        self,
        params: Params,
        step: int,
        chunks: Sequence[Chunk],
        cotangent: Params,
        grads: DataGrads,
        *,
        wrt_params: bool,
    ) -> tuple[Params | None, Params | None]:
        """Rebuild ``chunks`` of step ``step`` one at a time and pull ``cotangent`` back through
        each (Eq. M2): returns (sum_c g_c, sum_c H_c u or None), adds the data gradients into
        ``grads``. One chunk graph is alive at a time."""
        total = hvp = None
        for chunk in chunks:
            g, pull = self.chunk_vjp(params, step, chunk, wrt_params=wrt_params)
            hvp = tree_add(hvp, pull(cotangent, grads))
            del pull  # its graph is freed before the next chunk's is built
            total = tree_add(total, g)
        return total, hvp

    def pull_step(
        self, params: Params, step: int, cotangent: Params, grads: DataGrads, *, wrt_params: bool
    ) -> tuple[Params, Params | None]:
        """Rebuild step ``step`` at ``params`` = theta_i and pull ``cotangent`` u back through it:
        returns (g_i, H_i u or None), summed over ranks, and adds J_i^T u (and J_Y^T u) of this
        rank's rows into ``grads``."""
        g, hvp = self.pull_chunks(
            params, step, self.chunks[step], cotangent, grads, wrt_params=wrt_params
        )
        return self.across_ranks(g, hvp) if wrt_params else (self.across_ranks(g)[0], None)

    def open_step(
        self, params: Params, step: int, *, wrt_params: bool, keep_all: bool
    ) -> tuple[Params, StepPullback]:
        """g_i now, its pullback later: the first pass of a step whose graphs are kept.

        ``keep_all``: build and keep every chunk's graph. Otherwise keep only the last chunk's
        (the last graph the first pass builds, which costs no memory beyond one chunk graph); the
        other chunks are evaluated without a graph now and rebuilt one at a time by the pullback.
        """
        chunks = self.chunks[step]
        n_kept = len(chunks) if keep_all else min(1, len(chunks))
        rebuilt, kept_chunks = chunks[: len(chunks) - n_kept], chunks[len(chunks) - n_kept :]
        total = None
        for chunk in rebuilt:
            total = tree_add(total, self.chunk_grad_value(params, step, chunk))
        kept = []
        for chunk in kept_chunks:
            g, pull = self.chunk_vjp(params, step, chunk, wrt_params=wrt_params)
            kept.append(pull)
            total = tree_add(total, g)
        pullback = StepPullback(self, params, step, wrt_params, kept, rebuilt)
        return self.across_ranks(total)[0], pullback

    def trajectory_loss(self, final: Params) -> Tensor:
        """L = ||theta_T - target||^2 / D of the final student state theta_T."""
        return sq_norm(tree_sub(final, self.target)) / self.denominator

    def run_steps(self, first: int, last: int, params: Params) -> Iterator[Step]:
        """Yield (i, theta_i, g_i, theta_{i+1}) for i in [first, last), without autograd graphs."""
        for i in range(first, last):
            g = self.step_grad_value(params, i)
            with torch.no_grad():
                following = axpy(-self.beta, g, params)
            yield i, params, g, following
            params = following


@dataclass
class StepPullback:
    """The pending pullback of one step opened by :meth:`Problem.open_step` (apply it once).

    ``kept`` chunk pullbacks hold the graphs the first pass built; the ``rebuilt`` chunks are built
    again when the cotangent u comes, one at a time. Returns H_i u (None unless ``wrt_params``)
    and adds J_i^T u (and J_Y^T u) into the data gradients.
    """

    problem: Problem
    params: Params  # theta_i
    step: int
    wrt_params: bool
    kept: list[ChunkPullback]
    rebuilt: Sequence[Chunk]

    def __call__(self, cotangent: Params, grads: DataGrads) -> Params | None:
        hvp = None
        while self.kept:  # each graph is freed as soon as it has been pulled back
            hvp = tree_add(hvp, self.kept.pop()(cotangent, grads))
        _, rest = self.problem.pull_chunks(
            self.params, self.step, self.rebuilt, cotangent, grads, wrt_params=self.wrt_params
        )
        return self.problem.across_ranks(tree_add(hvp, rest))[0] if self.wrt_params else None


# ----------------------------------------------------------------------------------------------
# Building a Problem: validation and the rows of every step.


def split_steps(
    batches: tuple[Tensor, ...],
    microbatch_size: int | None,
    sizes: Sequence[int] | None = None,
    offsets: Sequence[int] | None = None,
) -> tuple[tuple[Chunk, ...], ...]:
    """Each step's rows in consecutive chunks of at most ``microbatch_size`` rows (Eq. M1).

    ``sizes[i]``: rows of step i's whole minibatch B_i; ``offsets[i]``: the position in it of
    this process's first row (on several ranks; by default this process holds all rows).
    """
    out = []
    for i, index in enumerate(batches):  # (n,) this process's rows of step i
        n = index.shape[0]
        if n == 0:  # this rank holds no row of step i
            out.append(())
            continue
        size = n if sizes is None else sizes[i]
        offset = 0 if offsets is None else offsets[i]
        m = n if microbatch_size is None else min(microbatch_size, n)
        if m == size:  # the whole minibatch in one chunk
            out.append((Chunk(index, None, 1.0),))
            continue
        out.append(
            tuple(
                Chunk(
                    index[a : a + m],
                    torch.arange(offset + a, offset + min(a + m, n), device=index.device),
                    min(m, n - a) / size,
                )
                for a in range(0, n, m)
            )
        )
    return tuple(out)


def make_problem(
    model,
    start,
    target,
    images,
    labels,
    beta,
    batches,
    augment=None,
    state_stride: int = 1,
    keep_graphs: int = 0,
    microbatch_size: int | None = None,
    group: object | None = None,
    method: str | None = None,
    methods: Sequence[str] = (),
) -> Problem:
    """Validate the arguments of :func:`~tesla_func.matching.match_trajectory`; bundle them as a
    :class:`Problem`.

    ``method`` (a name, checked against ``methods``, the registered names) takes part in the
    handshake of several ranks, which all must ask for the same method.
    Raises ``TypeError``/``ValueError`` naming the offending argument and the fix; with ``group``,
    on every rank (:func:`tesla_func.distributed.matching_handshake`), before any work. One
    process is the group of one: its handshake raises its own error or lays out its rows.
    """
    if group is not None:
        distributed.check_group(group)  # the same answer on every rank: no collective yet
    inputs: Inputs | None = None
    error = None
    try:
        if method is not None and method not in methods:
            raise ValueError(f"unknown method {method!r}; known methods: {sorted(methods)}")
        inputs = check_inputs(
            model=model, start=start, target=target, images=images, labels=labels, beta=beta,
            batches=batches, augment=augment, state_stride=state_stride,
            keep_graphs=keep_graphs, microbatch_size=microbatch_size,
            allow_empty_batches=group is not None,  # a rank may hold no row of a step
        )
    except (TypeError, ValueError) as caught:
        error = caught
    layout = distributed.matching_handshake(group, inputs, method, tuple(methods), error)
    sizes = [layout.size(i) for i in range(layout.steps)]
    offsets = [layout.offset(i) for i in range(layout.steps)]
    chunks = split_steps(inputs.batches, microbatch_size, sizes, offsets)
    m = microbatch_size or max(sizes)
    split = [i for i, b in enumerate(sizes) if layout.ranks_holding(i) > 1 or m < b]
    how = f"microbatch_size={microbatch_size}"
    if split and layout.ranks_holding(split[0]) > 1:
        how = f"its rows lie on {layout.ranks_holding(split[0])} ranks of group"
    check_split(split, sizes, inputs.model, inputs.augment, how)
    return Problem(
        model=inputs.model,
        buffers=inputs.buffers,
        start=inputs.start,
        target=inputs.target,
        images=inputs.images,
        labels=inputs.labels,
        beta=inputs.beta,
        batches=inputs.batches,
        augment=inputs.augment,
        state_stride=inputs.state_stride,
        keep_graphs=min(inputs.keep_graphs, layout.steps),  # more than T: keep every graph
        chunks=chunks,
        group=group,
    )

"""Trajectory matching, written functionally: one inner step, three ways to differentiate it.

The student starts at an expert checkpoint and takes T SGD steps on synthetic minibatches
(proofs/README.md has the notation)::

    theta_0 = start,   g_i = grad_theta l(theta_i; A_i(X[b_i]), Y[b_i]),
    theta_{i+1} = theta_i - beta g_i,   L = ||theta_T - target||^2 / D,   D = ||start - target||^2

where ``b_i`` is the i-th index batch and ``A_i`` the (replayed) augmentation of step i. Every
method returns the same loss and gradients of L with respect to the images X, the label logits Y
(soft labels only) and the student learning rate beta, and differs only in *which* gradient and at
what memory cost:

``unrolled``
    reverse-mode autodiff through all T steps (MTT). Exact; keeps T step graphs alive.
``tesla``
    the paper's two-pass method. Pass 1 runs the steps without graphs and accumulates
    ``G = sum_i g_i``; pass 2 recomputes each g_i with a graph and back-propagates
    ``v = -2 beta (theta_T - target) / D`` (proofs/b_two_pass.md). It treats every theta_i as a
    constant, so it is the gradient of the *first-order* loop
    ``theta_T = theta_0 - beta sum_i g(stopgrad(theta_i); ...)``: exact at T = 1, a truncation
    for T >= 2 (the dropped terms: proofs/b_two_pass.md, Eq. B4).
``exact``
    the adjoint method (proofs/c_adjoint.md): keep the T states theta_i (or every s-th and
    recompute), then walk back with one graph at a time::

        lam_T = 2 (theta_T - target) / D
        dX   += -beta J_i^T lam_{i+1},   dbeta += -g_i . lam_{i+1},
        lam_i = lam_{i+1} - beta H_i lam_{i+1}

    One vjp of (theta, X, Y) -> g returns H_i lam, J_X^T lam and J_Y^T lam together. Equal to
    ``unrolled`` up to rounding at the memory of ``tesla`` plus T parameter vectors.

Trading memory for time (``keep_graphs = k``, ``tesla`` and ``exact``): the first pass builds the
graphs of the last min(k, T) steps and keeps them, and the walk back pulls through them instead of
rebuilding them; the other steps are rebuilt as above. The last graph the first pass builds (the
whole last step when it is not split into microbatches) is kept in any case: built last, needed
first, it costs no memory. So without microbatches k = 0 and k = 1 are the same method, the
default. Memory grows by one step graph per kept step and the work shrinks by one step rebuild (a
forward and backward); at k = T, ``exact`` does the work of ``unrolled``, holds its T graphs and
returns its gradient. The gradient does not depend on k (up to rounding). ``unrolled`` ignores k.

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

All three share :class:`Problem` (validated inputs; each step's rows as :class:`Chunk` s) and
:meth:`Problem.chunk_loss` (the inner loss), and are registered in :data:`METHODS` with one
signature ``(problem) -> MatchResult``, each as a :class:`Method` that also says what it takes.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp

from tesla_func import distributed
from tesla_func.types import Params, RowAugment, StepAugment
from tesla_func.validation import Inputs, batch_statistics_only, check_inputs, check_split

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


class MatchResult(NamedTuple):
    """What every matching method returns (all tensors detached).

    loss:        () the normalised trajectory error L (proofs/README.md)
    images_grad: (N, C, H, W) dL/dX
    labels_grad: (N, K) dL/dY for float label logits; None for int class labels
    beta_grad:   () dL/dbeta

    ``lr_grad`` is a deprecated name of ``beta_grad``, kept for one release (it warns).
    """

    loss: Tensor
    images_grad: Tensor
    labels_grad: Tensor | None
    beta_grad: Tensor

    @property
    def lr_grad(self) -> Tensor:
        """Deprecated name of :attr:`beta_grad`."""
        warnings.warn("MatchResult.lr_grad is deprecated: read beta_grad (dL/dbeta)",
                      DeprecationWarning, stacklevel=2)
        return self.beta_grad


# ----------------------------------------------------------------------------------------------
# Small pytree helpers on name -> tensor dicts. Parameter dicts hold a handful of tensors, so plain
# comprehensions cost nothing next to one convolution and keep every line readable.


def _axpy(alpha: Tensor | float, x: Params, y: Params) -> Params:
    """y + alpha * x, key by key."""
    return {k: y[k] + alpha * x[k] for k in y}


def _sub(x: Params, y: Params) -> Params:
    return {k: x[k] - y[k] for k in x}


def _dot(x: Params, y: Params) -> Tensor:
    return sum((x[k] * y[k]).sum() for k in x)


def _sq_norm(x: Params) -> Tensor:
    return _dot(x, x)


def _add(total: Params | None, x: Params | None) -> Params | None:
    """total + x, where None is an empty sum (a step with no chunks, or no H u asked for)."""
    if total is None or x is None:
        return x if total is None else total
    return {k: total[k] + x[k] for k in total}


def _pull_once(pullback: Callable, cotangent: object) -> tuple:
    """Apply a ``torch.func.vjp`` pullback for the first and only time.

    ``retain_graph=False`` frees the graph node by node as the backward pass goes, and
    ``create_graph=False`` records no graph of the backward pass itself (no one differentiates
    these gradients again: results are detached). torch.func's defaults do both, and ``grad``
    cannot be told otherwise: written with ``grad_and_value``, ``unrolled`` peaked at 846 MiB
    instead of 396 MiB at T = 5 (ConvNet-3 width 32, 100 images) and took 1.15x the time.
    """
    return pullback(cotangent, retain_graph=False, create_graph=False)


class _DataGrads:
    """Running sums of dL/dX and dL/dY over the chunks' vjps (Y only for soft labels)."""

    def __init__(self, images: Tensor, labels: Tensor | None) -> None:
        self.images, self.labels = images, labels  # (N, C, H, W), (N, K) or None

    @classmethod
    def zeros(cls, p: Problem) -> _DataGrads:
        return cls(
            torch.zeros_like(p.images), torch.zeros_like(p.labels) if p.soft_labels else None
        )

    def add(self, index: Tensor, images: Tensor, labels: Tensor | None) -> None:
        """Add one chunk's u^T dg/dx (n, C, H, W) (and u^T dg/dy (n, K)) at its rows ``index``."""
        with torch.no_grad():
            self.images.index_add_(0, index, images)
            if self.labels is not None:
                self.labels.index_add_(0, index, labels)


ChunkPullback = Callable[[Params, _DataGrads], "Params | None"]


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
        return _sq_norm(_sub(self.start, self.target))

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
            return _axpy(-beta, g, params)
        share = {k: beta * (v * 0 if g is None else g[k]) for k, v in params.items()}
        return _sub(params, distributed.sum_over_ranks_differentiable(self.group, share))

    def step_grad(self, params: Params, images: Tensor, labels: Tensor, step: int) -> Params | None:
        """This rank's share of g_i, sum_c grad_theta w_c l_c over its chunks (Eq. M1): all of
        g_i on one process. Differentiable in all inputs (``unrolled``); None without chunks.

        ``images``/``labels`` are the full synthetic set, so that differentiating through the
        indexing returns gradients of full shape.
        """
        total = None
        for chunk in self.chunks[step]:
            x, y = images[chunk.index], labels[chunk.index]
            total = _add(total, grad(self.chunk_loss)(params, x, y, step, chunk))
        return total

    def step_grad_value(self, params: Params, step: int) -> Params:
        """g_i as a plain value (no graph), for the passes that only need the student's states.

        The same number as :meth:`step_grad`, chunk by chunk from one ``vjp`` of the chunk's loss
        pulled back without a graph (:func:`_pull_once`). ``grad`` always builds the graph of its
        backward pass, with twice-differentiable composite kernels (GroupNorm's backward costs
        several times its fused kernel): 1.2x the time of this step.
        """
        total = None
        for chunk in self.chunks[step]:
            total = _add(total, self.chunk_grad_value(params, step, chunk))
        return self.across_ranks(total)[0]

    def chunk_grad_value(self, params: Params, step: int, chunk: Chunk) -> Params:
        """g_c = grad_theta w_c l_c as a plain value, from one vjp of the chunk's loss."""
        x, y = self.images[chunk.index], self.labels[chunk.index]
        loss, pullback = vjp(lambda theta: self.chunk_loss(theta, x, y, step, chunk), params)
        return _pull_once(pullback, torch.ones_like(loss))[0]

    def chunk_vjp(
        self, params: Params, step: int, chunk: Chunk, *, wrt_params: bool
    ) -> tuple[Params, ChunkPullback]:
        """g_c = grad_theta w_c l_c and its pullback over (theta if ``wrt_params``, x, y if soft).

        One ``vjp`` call over the chunk's rows x = X[index] (and y = Y[index]). The pullback maps a
        cotangent u (a parameter dict) and the running data gradients to u^T dg_c/dtheta (the
        Hessian-vector product H_c u; None unless ``wrt_params``), after adding u^T dg_c/dx
        (and u^T dg_c/dy) into the data gradients at the chunk's rows. It holds the chunk's graph,
        frees it as it runs (:func:`_pull_once`), and can be applied only once.
        """
        soft = self.soft_labels
        x, y = self.images[chunk.index], self.labels[chunk.index]

        def g_of(*primals: Tensor | Params) -> Params:
            theta, rest = (primals[0], primals[1:]) if wrt_params else (params, primals)
            return grad(self.chunk_loss)(theta, rest[0], rest[1] if soft else y, step, chunk)

        primals = (*((params,) if wrt_params else ()), x, *((y,) if soft else ()))
        g, pullback = vjp(g_of, *primals)

        def pull(cotangent: Params, grads: _DataGrads) -> Params | None:
            out = list(_pull_once(pullback, cotangent))
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
        grads: _DataGrads,
        *,
        wrt_params: bool,
    ) -> tuple[Params | None, Params | None]:
        """Rebuild ``chunks`` of step ``step`` one at a time and pull ``cotangent`` back through
        each (Eq. M2): returns (sum_c g_c, sum_c H_c u or None), adds the data gradients into
        ``grads``. One chunk graph is alive at a time."""
        total = hvp = None
        for chunk in chunks:
            g, pull = self.chunk_vjp(params, step, chunk, wrt_params=wrt_params)
            hvp = _add(hvp, pull(cotangent, grads))
            del pull  # its graph is freed before the next chunk's is built
            total = _add(total, g)
        return total, hvp

    def pull_step(
        self, params: Params, step: int, cotangent: Params, grads: _DataGrads, *, wrt_params: bool
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
            total = _add(total, self.chunk_grad_value(params, step, chunk))
        kept = []
        for chunk in kept_chunks:
            g, pull = self.chunk_vjp(params, step, chunk, wrt_params=wrt_params)
            kept.append(pull)
            total = _add(total, g)
        pullback = StepPullback(self, params, step, wrt_params, kept, rebuilt)
        return self.across_ranks(total)[0], pullback

    def trajectory_loss(self, final: Params) -> Tensor:
        """L = ||theta_T - target||^2 / D of the final student state theta_T."""
        return _sq_norm(_sub(final, self.target)) / self.denominator

    def run_steps(self, first: int, last: int, params: Params) -> Iterator[Step]:
        """Yield (i, theta_i, g_i, theta_{i+1}) for i in [first, last), without autograd graphs."""
        for i in range(first, last):
            g = self.step_grad_value(params, i)
            with torch.no_grad():
                following = _axpy(-self.beta, g, params)
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

    def __call__(self, cotangent: Params, grads: _DataGrads) -> Params | None:
        hvp = None
        while self.kept:  # each graph is freed as soon as it has been pulled back
            hvp = _add(hvp, self.kept.pop()(cotangent, grads))
        _, rest = self.problem.pull_chunks(
            self.params, self.step, self.rebuilt, cotangent, grads, wrt_params=self.wrt_params
        )
        return self.problem.across_ranks(_add(hvp, rest))[0] if self.wrt_params else None


# ----------------------------------------------------------------------------------------------
# The three gradient methods. Each takes a Problem and returns a MatchResult.


def unrolled(p: Problem) -> MatchResult:
    """MTT: reverse-mode autodiff through all T steps; memory grows with T (all graphs alive).

    On W ranks every rank computes the same L, and each differentiates its share L / W of the
    sum of the ranks' losses: through the all-reduces of the updates (:meth:`Problem.descend`),
    whose backward sums the ranks' cotangents, that is exactly dL/dX for its own rows, and for the
    learning rate, which every rank holds, its share of dL/dbeta, summed over the ranks at the end.
    """
    soft = p.soft_labels

    def loss_of(images: Tensor, beta: Tensor, *labels: Tensor) -> Tensor:
        params = p.start
        for i in range(p.steps):
            g = p.step_grad(params, images, labels[0] if soft else p.labels, i)
            params = p.descend(params, beta, g)
        return p.trajectory_loss(params)

    loss, pullback = vjp(loss_of, p.images, p.beta, *((p.labels,) if soft else ()))
    share = torch.full_like(loss, 1.0 / p.world_size)  # dL/dL on one process; 1/W on W ranks
    images_grad, beta_grad, *labels_grad = _pull_once(pullback, share)
    if p.group is not None:
        (beta_grad,) = p.across_ranks({"beta": beta_grad})
        beta_grad = beta_grad["beta"]
    return MatchResult(loss.detach(), images_grad, labels_grad[0] if soft else None, beta_grad)


def _rebuilt_steps(p: Problem) -> int:
    """R: the first pass takes steps 0 .. R-1 without graphs (the walk back rebuilds them) and
    opens steps R .. T-1 (:meth:`Problem.open_step`): the last k = keep_graphs steps keep every
    chunk's graph, and the last step is opened in any case, keeping at least its last chunk's
    graph (built last and needed first, so keeping it costs no memory)."""
    return min(p.steps - p.keep_graphs, p.steps - 1)


def tesla(p: Problem) -> MatchResult:
    """TESLA's two-pass gradient: the first-order truncation of ``unrolled`` (proofs Eq. B3).

    Pass 1 (no graph): theta_T and G = sum_i g_i. Then L, dL/dbeta = -2 (theta_T - target).G / D and
    v = -2 beta (theta_T - target) / D (proofs/b_two_pass.md, Eq. B1). Pass 2 recomputes each
    g_i with a graph over the images (and label logits) only and accumulates v^T dg_i/dX;
    theta_i is rebuilt from the recomputed g_i, so nothing of size T is stored.

    The last k = keep_graphs steps, and the last chunk of the last step in any case, are taken
    with their graphs already in pass 1 (:func:`_rebuilt_steps`); their vjps wait for v.
    Memory: k step graphs (at least one chunk graph) at the end of pass 1, then one chunk graph.
    """
    rebuilt, first_kept = _rebuilt_steps(p), p.steps - p.keep_graphs
    total = {k: torch.zeros_like(v) for k, v in p.start.items()}  # G = sum_i g_i
    params = p.start
    pending: list[StepPullback] = []  # steps opened in pass 1, each holding kept graphs
    for i in range(p.steps):
        if i < rebuilt:
            g = p.step_grad_value(params, i)
        else:
            g, pullback = p.open_step(params, i, wrt_params=False, keep_all=i >= first_kept)
            pending.append(pullback)
        with torch.no_grad():
            total = _axpy(1.0, g, total)
            params = _axpy(-p.beta, g, params)  # ends as theta_T
    with torch.no_grad():
        residual = _sub(params, p.target)  # theta_T - target
        loss = _sq_norm(residual) / p.denominator
        beta_grad = -2.0 * _dot(residual, total) / p.denominator
        v = {k: (-2.0 * p.beta / p.denominator) * r for k, r in residual.items()}

    grads = _DataGrads.zeros(p)
    while pending:  # last step first; each graph is freed as soon as it has been pulled back
        pending.pop()(v, grads)
    params = p.start
    for i in range(rebuilt):
        g, _ = p.pull_step(params, i, v, grads, wrt_params=False)
        with torch.no_grad():
            params = _axpy(-p.beta, g, params)
    return MatchResult(loss, grads.images, grads.labels, beta_grad)


def exact(p: Problem) -> MatchResult:
    """Exact adjoint gradient with one step graph alive at a time (proofs/c_adjoint.md, Eqs. C1-C6).

    Forward (no graph): keep theta_i for i a multiple of ``state_stride`` (s); the last
    k = keep_graphs steps, and the last chunk of the last step in any case, are taken with their
    graphs (:func:`_rebuilt_steps`), which the walk back uses first. Backward: for i from T - 1
    down to 0, rebuild theta_i from its checkpoint (s > 1: once per segment of s steps) unless
    step i was opened, and take one vjp of (theta, X, Y) -> g_i per chunk with cotangent
    -beta lam_{i+1} (on several ranks, g_i and H_i lam summed over them)::

        (-beta H_i lam, -beta J_X^T lam, -beta J_Y^T lam) = vjp(lam * -beta)
        lam_i = lam_{i+1} - beta H_i lam_{i+1}
        dbeta += -g_i . lam_{i+1}

    Memory: k step graphs (at least one chunk graph) + (T/s + s) parameter vectors. Compute:
    T - k recomputed step graphs; s > 1 adds (s - 1)/s of a forward pass of gradients. At
    k = T nothing is recomputed: the work and the memory of ``unrolled``, and its gradient.
    """
    s = p.state_stride
    rebuilt, first_kept = _rebuilt_steps(p), p.steps - p.keep_graphs
    checkpoints: dict[int, Params] = {0: p.start}  # only the states of rebuilt steps are needed
    pending: dict[int, tuple[Params, StepPullback]] = {}
    params = p.start
    for i in range(p.steps):
        if i < rebuilt:
            g = p.step_grad_value(params, i)
        else:
            g, pullback = p.open_step(params, i, wrt_params=True, keep_all=i >= first_kept)
            pending[i] = (g, pullback)
        with torch.no_grad():
            params = _axpy(-p.beta, g, params)  # ends as theta_T
        if (i + 1) % s == 0 and i + 1 < rebuilt:
            checkpoints[i + 1] = params
    with torch.no_grad():
        residual = _sub(params, p.target)  # theta_T - target
        loss = _sq_norm(residual) / p.denominator
        lam = {name: (2.0 / p.denominator) * r for name, r in residual.items()}  # dL/dtheta_T

    grads = _DataGrads.zeros(p)
    beta_grad = torch.zeros_like(p.beta)
    segment: list[Params] = []  # theta_c .. theta_i, rebuilt from the checkpoint c <= i
    for i in reversed(range(p.steps)):
        cotangent = {name: -p.beta * v for name, v in lam.items()}
        if i in pending:
            g, pullback = pending.pop(i)
            hvp = pullback(cotangent, grads)
            del pullback  # its kept graphs are freed
        else:
            if not segment:
                first = i - i % s
                state = checkpoints.pop(first)
                segment = [state] + [after for *_, after in p.run_steps(first, i, state)]
            g, hvp = p.pull_step(segment.pop(), i, cotangent, grads, wrt_params=True)
        with torch.no_grad():
            beta_grad -= _dot(g, lam)
            lam = _axpy(1.0, hvp, lam)
    return MatchResult(loss, grads.images, grads.labels, beta_grad)


@dataclass(frozen=True)
class Method:
    """A registered gradient method: the function and what it takes and returns.

    Called like the function (``METHODS[name](problem)``). What a method takes is stated here
    once: planner, benchmarks and configs read it from the registry."""

    run: Callable[[Problem], MatchResult]
    gradient: str  # "exact": MTT's gradient up to rounding; "first-order": a truncation (Eq. B4)
    takes_keep_graphs: bool  # keeps the last k first-pass step graphs (keep_graphs = k)
    takes_state_stride: bool  # keeps every s-th student state (state_stride = s)

    def __call__(self, problem: Problem) -> MatchResult:
        return self.run(problem)


METHODS: dict[str, Method] = {
    "unrolled": Method(unrolled, "exact", takes_keep_graphs=False, takes_state_stride=False),
    "tesla": Method(tesla, "first-order", takes_keep_graphs=True, takes_state_stride=False),
    "exact": Method(exact, "exact", takes_keep_graphs=True, takes_state_stride=True),
}
"""Registry of gradient methods by name; tests and benchmarks loop over it."""
KEEP_METHODS = tuple(name for name, m in METHODS.items() if m.takes_keep_graphs)
"""The methods that take ``keep_graphs`` (from :data:`METHODS`)."""


# ----------------------------------------------------------------------------------------------
# Input validation and the public entry point.


def _split_steps(
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
) -> Problem:
    """Validate the arguments of :func:`match_trajectory` and bundle them as a :class:`Problem`.

    Raises ``TypeError``/``ValueError`` naming the offending argument and the fix; with ``group``,
    on every rank (:func:`tesla_func.distributed.matching_handshake`), before any work. One
    process is the group of one: its handshake raises its own error or lays out its rows.
    """
    if group is not None:
        distributed.check_group(group)  # the same answer on every rank: no collective yet
    inputs: Inputs | None = None
    error = None
    try:
        if method is not None and method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known methods: {sorted(METHODS)}")
        inputs = check_inputs(
            model=model, start=start, target=target, images=images, labels=labels, beta=beta,
            batches=batches, augment=augment, state_stride=state_stride,
            keep_graphs=keep_graphs, microbatch_size=microbatch_size,
            allow_empty_batches=group is not None,  # a rank may hold no row of a step
        )
    except (TypeError, ValueError) as caught:
        error = caught
    layout = distributed.matching_handshake(group, inputs, method, tuple(METHODS), error)
    sizes = [layout.size(i) for i in range(layout.steps)]
    offsets = [layout.offset(i) for i in range(layout.steps)]
    chunks = _split_steps(inputs.batches, microbatch_size, sizes, offsets)
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


def _accepts_lr(match: Callable[..., MatchResult]) -> Callable[..., MatchResult]:
    """``match(..., lr=x)``, the deprecated name of the keyword ``beta``, as ``beta=x`` (with a
    DeprecationWarning), for one release."""

    @functools.wraps(match)
    def wrapper(*args: object, **kwargs: object) -> MatchResult:
        if "lr" in kwargs:
            if "beta" in kwargs or len(args) > 5:
                raise TypeError(f"{match.__name__}() got beta twice: as lr= (its deprecated "
                                "name) and as beta")
            warnings.warn(f"{match.__name__}(lr=...) is deprecated: pass beta=... (the student "
                          "learning rate)", DeprecationWarning, stacklevel=2)
            kwargs["beta"] = kwargs.pop("lr")
        return match(*args, **kwargs)

    return wrapper


@_accepts_lr
def match_trajectory(
    model: nn.Module,
    start: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    images: Tensor,
    labels: Tensor,
    beta: Tensor | float,
    batches: Sequence[Tensor],
    method: str = "tesla",
    augment: StepAugment | None = None,
    *,
    state_stride: int = 1,
    keep_graphs: int = 0,
    microbatch_size: int | None = None,
    group: object | None = None,
) -> MatchResult:
    """Trajectory-matching loss L (proofs/README.md) and its gradients w.r.t. images, labels, beta.

    Args:
        model: skeleton ``nn.Module``; its parameters are replaced by ``start`` etc. through
            ``functional_call`` (strict: every parameter must be given). Buffers are read, never
            written: train-mode BatchNorm uses batch statistics.
        start, target: expert checkpoints theta*_t and theta*_{t+M}, name -> tensor.
        images: (N, C, H, W) synthetic images X.
        labels: (N,) int64 classes (hard) or (N, K) float label logits Y (soft: the inner loss is
            cross-entropy against softmax(Y)).
        beta: scalar tensor, the student learning rate beta > 0. Also accepted as the keyword
            ``lr=``, its deprecated name, for one release (with a DeprecationWarning).
        batches: T LongTensors of indices into ``images``, one per student step.
        method: a key of :data:`METHODS`: "unrolled", "tesla" or "exact".
        augment: optional ``(x, step) -> x``; must give the same transform every time it is called
            with the same step (the two-pass and adjoint methods call it twice per step). When a
            minibatch is split (``microbatch_size``), it is called per chunk as
            ``augment(x, step, rows=rows)`` with the positions ``rows`` (n,) of the chunk's rows
            in the step's minibatch, and must then apply the transforms drawn for those rows
            (:class:`tesla_func.types.RowAugment`; ``DSA().replayable`` gives one). An augment
            with a ``batch_sizes`` attribute (ReplayedDSA) is checked against the minibatches.
        state_stride: "exact" only: keep every s-th student state and recompute the others.
        keep_graphs: "tesla" and "exact": k >= 0, the number of final steps whose graphs, built in
            the first pass, are kept for the walk back instead of being rebuilt (trades memory for
            time). The last graph the first pass builds is always kept (it is the first one the
            walk back needs): the last step's, or with microbatches its last chunk's. So without
            microbatches k = 0 and k = 1 are the same method, the default. k > T is clamped to T
            (every graph kept). Costs k step graphs of memory and saves about k step rebuilds; at
            k = T "exact" does the work and holds the memory of "unrolled". The gradient does not
            depend on k (up to rounding). "unrolled" ignores it: it keeps all T graphs anyway.
        microbatch_size: None (default: whole minibatches) or m >= 1: every step's minibatch goes
            through the network in consecutive chunks of at most m rows, and its gradient is the
            size-weighted sum of theirs (Eq. M1), the same result up to rounding. "tesla" and
            "exact" then hold about one chunk's graph at a time (kept steps hold all of theirs).
            Raises ValueError when a split would meet BatchNorm using batch statistics (train
            mode): use eval mode or instance norm, or do not split.
        group: None (one process) or an initialised ``torch.distributed`` process group whose
            ranks share the call (every rank calls with the same group). Each rank passes its own
            shard of the synthetic set as ``images``/``labels`` (N_r >= 1 rows) and, in
            ``batches``, its own rows of each step's minibatch as indices into its shard (an
            empty tensor where it holds none; every step needs a row on some rank). Step i's
            minibatch is all ranks' rows in rank order, so the result is one process's call on
            the concatenated shards and minibatches (up to rounding). Everything else (start,
            target, beta, method, T, state_stride, keep_graphs, microbatch_size, the model, the
            label kind, the augmentation) must be the same on every rank; the augmentation is
            drawn for the whole minibatches (every rank from the same generator state) and each
            rank's chunks get their rows' positions in them (``rows=``). Only parameter-sized
            tensors cross ranks (all-reduces of g_i and H_i u). Bad input raises on every rank
            before any work: on one rank's own arguments, on ranks that disagree (compared by
            checksums), on a step with no rows anywhere, on train-mode BatchNorm (a step split
            over ranks), and when torch.distributed is not initialised.

    Returns:
        :class:`MatchResult` (loss, images_grad, labels_grad or None, beta_grad), all detached.
        Inputs are not modified. With ``group``: loss and beta_grad are the same on every rank
        (bit for bit), images_grad/labels_grad are this rank's shard's (N_r rows).
    """
    problem = make_problem(
        model=model, start=start, target=target, images=images, labels=labels, beta=beta,
        batches=batches, augment=augment, state_stride=state_stride, keep_graphs=keep_graphs,
        microbatch_size=microbatch_size, group=group, method=method,
    )
    with batch_statistics_only(model):
        return METHODS[method](problem)

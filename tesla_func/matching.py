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

Microbatches (``microbatch_size``) and several processes (``group``) split each step's rows
into chunks whose gradients and pullbacks add up exactly (Eqs. M1-M2): :mod:`tesla_func.problem`.

All three share :class:`Problem` (validated inputs; each step's rows as :class:`Chunk` s) and
:meth:`Problem.chunk_loss` (the inner loss), and are registered in :data:`METHODS` with one
signature ``(problem) -> MatchResult``, each as a :class:`Method` that also says what it takes.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import vjp

from tesla_func.problem import (
    DataGrads,
    Problem,
    StepPullback,
    axpy,
    make_problem,
    pull_once,
    sq_norm,
    tree_dot,
    tree_sub,
)
from tesla_func.types import Params, StepAugment
from tesla_func.validation import batch_statistics_only


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
    images_grad, beta_grad, *labels_grad = pull_once(pullback, share)
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
            total = axpy(1.0, g, total)
            params = axpy(-p.beta, g, params)  # ends as theta_T
    with torch.no_grad():
        residual = tree_sub(params, p.target)  # theta_T - target
        loss = sq_norm(residual) / p.denominator
        beta_grad = -2.0 * tree_dot(residual, total) / p.denominator
        v = {k: (-2.0 * p.beta / p.denominator) * r for k, r in residual.items()}

    grads = DataGrads.zeros(p)
    while pending:  # last step first; each graph is freed as soon as it has been pulled back
        pending.pop()(v, grads)
    params = p.start
    for i in range(rebuilt):
        g, _ = p.pull_step(params, i, v, grads, wrt_params=False)
        with torch.no_grad():
            params = axpy(-p.beta, g, params)
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
            params = axpy(-p.beta, g, params)  # ends as theta_T
        if (i + 1) % s == 0 and i + 1 < rebuilt:
            checkpoints[i + 1] = params
    with torch.no_grad():
        residual = tree_sub(params, p.target)  # theta_T - target
        loss = sq_norm(residual) / p.denominator
        lam = {name: (2.0 / p.denominator) * r for name, r in residual.items()}  # dL/dtheta_T

    grads = DataGrads.zeros(p)
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
            beta_grad -= tree_dot(g, lam)
            lam = axpy(1.0, hvp, lam)
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
# The public entry point.


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
    keep_graphs: int | str = 0,
    microbatch_size: int | None = None,
    group: object | None = None,
    memory_budget: str | int | None = None,
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
            ``"auto"``: the largest k whose call fits the memory free on the images' device (or
            ``memory_budget``), found on the planner's line in k, once per call shape in this
            process (:mod:`tesla_func.planner.auto`; the augmentation is planned as DSA's costliest
            family, so ``augment`` must be None or a ``ReplayedDSA``). On several ranks, the
            smallest k of any rank. The default stays 0, the documented constant memory.
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
        memory_budget: with ``keep_graphs="auto"``, the memory the call may add on its device
            ("8GB", or bytes) instead of a fraction of the free memory; ignored otherwise.

    Returns:
        :class:`MatchResult` (loss, images_grad, labels_grad or None, beta_grad), all detached.
        Inputs are not modified. With ``group``: loss and beta_grad are the same on every rank
        (bit for bit), images_grad/labels_grad are this rank's shard's (N_r rows).
    """
    if keep_graphs == "auto":
        keep_graphs = _auto_keep_graphs(model, images, labels, batches, method, augment,
                                        state_stride, microbatch_size, group, memory_budget)
    problem = make_problem(
        model=model, start=start, target=target, images=images, labels=labels, beta=beta,
        batches=batches, augment=augment, state_stride=state_stride, keep_graphs=keep_graphs,
        microbatch_size=microbatch_size, group=group, method=method, methods=tuple(METHODS),
    )
    with batch_statistics_only(model):
        return METHODS[method](problem)


def _auto_keep_graphs(model, images, labels, batches, method, augment, state_stride,
                      microbatch_size, group, memory_budget) -> int:
    """keep_graphs="auto" for one call: :func:`tesla_func.planner.auto.choose_keep_graphs` on the
    call's shapes (bad arguments are left to the validation that follows, which names them)."""
    # imported here: the planner imports this module (its predictions run match_trajectory)
    from tesla_func.augment import ReplayedDSA
    from tesla_func.data import DatasetShape
    from tesla_func.distill_config import DistillConfig
    from tesla_func.distributed import max_float
    from tesla_func.planner.auto import RunShape, choose_keep_graphs
    from tesla_func.validation import has_values

    if method not in METHODS or not METHODS[method].takes_keep_graphs:
        return 0
    if not isinstance(images, Tensor) or images.dim() != 4 or not has_values(images):
        return 0  # a prediction (fake tensors) plans auto as k = 0, as the planner does
    if augment is not None and not isinstance(augment, ReplayedDSA):
        raise ValueError("keep_graphs='auto' plans the augmentation as DSA (a ReplayedDSA from "
                         "DSA().replayable) or none; pass keep_graphs=k for another augment")
    n, channels, height, _ = images.shape
    soft = isinstance(labels, Tensor) and labels.is_floating_point()
    sizes = [len(b) for b in batches]
    run = RunShape(
        distill=DistillConfig(label_strategy="learned" if soft else "hard",
                              dsa=augment is not None, state_stride=state_stride,
                              microbatch_size=microbatch_size, batch_syn=max(sizes) or 1),
        shape=DatasetShape(channels, height, labels.shape[1] if soft else 1, n),
        model=model, num_images=n, torch_dtype=images.dtype,
    )
    keep = choose_keep_graphs(run, method, len(sizes), images.device,
                              memory_budget=memory_budget, transient=False).keep
    return keep if group is None else int(-max_float(group, -keep))

"""Trajectory matching, written functionally: one inner step, three ways to differentiate it.

The student starts at an expert checkpoint and takes T SGD steps on synthetic minibatches
(proofs/README.md has the notation)::

    theta_0 = start,   g_i = grad_theta l(theta_i; A_i(X[b_i]), Y[b_i]),   theta_{i+1} = theta_i - beta g_i
    L = ||theta_T - target||^2 / D,   D = ||start - target||^2       (notation of proofs/README.md)

where ``b_i`` is the i-th index batch and ``A_i`` the (replayed) augmentation of step i. Every method
returns the same loss and gradients of L with respect to the images X, the label logits Y (soft
labels only) and the student learning rate beta, and differs only in *which* gradient and at what
memory cost:

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
    the adjoint method (proofs/c_adjoint.md): keep the T states theta_i (or every k-th and
    recompute), then walk back with one graph at a time::

        lam_T = 2 (theta_T - target) / D
        dX   += -beta J_i^T lam_{i+1},  dbeta += -g_i . lam_{i+1},  lam_i = lam_{i+1} - beta H_i lam_{i+1}

    One vjp of (theta, X, Y) -> g returns H_i lam, J_X^T lam and J_Y^T lam together. Equal to
    ``unrolled`` up to rounding at the memory of ``tesla`` plus T parameter vectors.

Trading memory for time (``keep_graphs = k``, ``tesla`` and ``exact``): the first pass builds the
graphs of the last K = max(1, min(k, T)) steps and keeps them, and the walk back pulls through them
instead of rebuilding them; the other T - K steps are rebuilt as above. The last step's graph was
always kept (built last, needed first), so k = 0 and k = 1 are both the default method. Memory grows
by one step graph per kept step and the work shrinks by one step rebuild (a forward and backward);
at k = T, ``exact`` does the work of ``unrolled``, holds its T graphs and returns its gradient.
The gradient does not depend on k (tests: float64, rtol 1e-10). ``unrolled`` ignores k.

All three share :class:`Problem` (validated inputs) and :meth:`Problem.step_grad` (the inner step), and
are registered in :data:`METHODS` with one signature ``(problem) -> MatchResult``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp
from torch._subclasses.fake_tensor import is_fake

from tesla_func.types import Params, StepAugment

Step = tuple[int, Params, Params, Params]  # (i, theta_i, g_i, theta_{i+1})


class StepCotangents(NamedTuple):
    """What one step's pullback returns for a cotangent u on g_i (see :meth:`Problem.step_vjp`)."""

    params: Params | None  # u^T dg_i/dtheta_i (the Hessian-vector product H_i u), if asked for
    images: Tensor  # (N, C, H, W) u^T dg_i/dX
    labels: Tensor | None  # (N, K) u^T dg_i/dY for soft labels, else None


class MatchResult(NamedTuple):
    """What every matching method returns (all tensors detached).

    loss:        () the normalised trajectory error L (proofs/README.md)
    images_grad: (N, C, H, W) dL/dX
    labels_grad: (N, K) dL/dY for float label logits; None for int class labels
    lr_grad:     () dL/dbeta
    """

    loss: Tensor
    images_grad: Tensor
    labels_grad: Tensor | None
    lr_grad: Tensor


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


def _pull_once(pullback: Callable, cotangent: object) -> tuple:
    """Apply a ``torch.func.vjp`` pullback for the first and only time.

    ``retain_graph=False`` frees the graph node by node as the backward pass goes, and
    ``create_graph=False`` records no graph of the backward pass itself (no one differentiates
    these gradients again: results are detached). torch.func's defaults do both, and ``grad``
    cannot be told otherwise: written with ``grad_and_value``, ``unrolled`` peaked at 846 MiB
    instead of 396 MiB at T = 5 (ConvNet-3 width 32, 100 images) and took 1.15x the time.
    """
    return pullback(cotangent, retain_graph=False, create_graph=False)


@contextlib.contextmanager
def _batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """Let train-mode BatchNorm layers normalise with batch statistics without touching buffers.

    A student step only *reads* batch statistics in train mode; updating running statistics inside
    ``grad``/``vjp`` is an in-place write on a captured tensor (torch.func refuses it), and a
    recomputed step (two-pass, adjoint) would update them twice. Turning ``track_running_stats`` off
    for the duration of the call does exactly what the step needs; the flag is restored after.
    """
    flipped = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for m in flipped:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in flipped:
            m.track_running_stats = True


# ----------------------------------------------------------------------------------------------
# The problem: validated inputs and the one inner step every method shares.


@dataclass(frozen=True)
class Problem:
    """Validated inputs of one matching call. Build it with :func:`make_problem`."""

    model: nn.Module
    buffers: Params  # the model's buffers (read only: see _batch_statistics_only)
    start: Params  # theta_0 = theta*_t
    target: Params  # theta*_{t+M}
    images: Tensor  # (N, C, H, W)
    labels: Tensor  # (N,) int64 class indices, or (N, K) float label logits
    lr: Tensor  # () beta > 0
    batches: tuple[Tensor, ...]  # T index tensors (B_i,) into images
    augment: StepAugment | None
    state_stride: int  # exact: keep every s-th student state, recompute the others
    keep_graphs: int  # tesla, exact: the last max(1, k) steps keep their pass-1 graphs (k <= T)

    @property
    def steps(self) -> int:
        return len(self.batches)

    @property
    def soft_labels(self) -> bool:
        return self.labels.is_floating_point()

    @property
    def denominator(self) -> Tensor:
        """D = ||start - target||^2, a constant of the expert trajectory."""
        return _sq_norm(_sub(self.start, self.target))

    def inner_loss(self, params: Params, images: Tensor, labels: Tensor, step: int) -> Tensor:
        """l(theta; A_i(X[b_i]), Y[b_i]): mean cross-entropy of the student on minibatch ``step``.

        ``images``/``labels`` are the full synthetic set so that differentiating through the
        indexing returns gradients of full shape. Soft labels are logits: the target is
        softmax(Y[b_i]) and the loss -sum_k softmax(Y)_k log softmax(f(x))_k.
        """
        index = self.batches[step]
        x = images[index]  # (B, C, H, W)
        if self.augment is not None:
            x = self.augment(x, step)
        logits = functional_call(self.model, (params, self.buffers), (x,), strict=True)  # (B, K)
        y = labels[index]
        target = F.softmax(y, dim=-1) if self.soft_labels else y
        return F.cross_entropy(logits, target)

    def step_grad(self, params: Params, images: Tensor, labels: Tensor, step: int) -> Params:
        """g_i = grad_theta l(theta_i; ...) as a name -> tensor dict (differentiable in all inputs)."""
        return grad(self.inner_loss)(params, images, labels, step)

    def step_grad_value(self, params: Params, step: int) -> Params:
        """g_i as a plain value (no graph), for the passes that only need the student's states.

        The same number as :meth:`step_grad`, from one ``vjp`` of the loss pulled back without a
        graph (:func:`_pull_once`). ``grad`` always builds the graph of its backward pass, with
        twice-differentiable composite kernels (GroupNorm's backward costs several times its
        fused kernel): 1.2x the time of this step.
        """
        loss, pullback = vjp(
            lambda theta: self.inner_loss(theta, self.images, self.labels, step), params
        )
        (g,) = _pull_once(pullback, torch.ones_like(loss))
        return g

    def step_vjp(
        self, params: Params, step: int, *, wrt_params: bool
    ) -> tuple[Params, Callable[[Params], StepCotangents]]:
        """g_i and the pullback of g_i over (theta_i if ``wrt_params``, X, Y if soft labels).

        One ``vjp`` call: the pullback maps a cotangent u (a parameter dict) to
        ``StepCotangents(u^T dg/dtheta or None, u^T dg/dX, u^T dg/dY or None)``. It holds this
        step's graph, frees it as it runs (:func:`_pull_once`), and can be applied only once.
        """
        soft = self.soft_labels

        def g_of(*primals: object) -> Params:
            theta, rest = (primals[0], primals[1:]) if wrt_params else (params, primals)
            return self.step_grad(theta, rest[0], rest[1] if soft else self.labels, step)

        primals = (
            *((params,) if wrt_params else ()),
            self.images,
            *((self.labels,) if soft else ()),
        )
        g, pullback = vjp(g_of, *primals)

        def pull(cotangent: Params) -> StepCotangents:
            out = list(_pull_once(pullback, cotangent))
            return StepCotangents(
                out.pop(0) if wrt_params else None, out[0], out[1] if soft else None
            )

        return g, pull

    def trajectory_loss(self, final: Params) -> Tensor:
        """L = ||theta_T - target||^2 / D of the final student state theta_T."""
        return _sq_norm(_sub(final, self.target)) / self.denominator

    def run_steps(self, first: int, last: int, params: Params) -> Iterator[Step]:
        """Yield (i, theta_i, g_i, theta_{i+1}) for i in [first, last), without autograd graphs."""
        for i in range(first, last):
            g = self.step_grad_value(params, i)
            with torch.no_grad():
                following = _axpy(-self.lr, g, params)
            yield i, params, g, following
            params = following


# ----------------------------------------------------------------------------------------------
# The three gradient methods. Each takes a Problem and returns a MatchResult.


def unrolled(p: Problem) -> MatchResult:
    """MTT: reverse-mode autodiff through all T steps; memory grows with T (all graphs alive)."""
    soft = p.soft_labels

    def loss_of(images: Tensor, lr: Tensor, *labels: Tensor) -> Tensor:
        params = p.start
        for i in range(p.steps):
            params = _axpy(
                -lr, p.step_grad(params, images, labels[0] if soft else p.labels, i), params
            )
        return p.trajectory_loss(params)

    loss, pullback = vjp(loss_of, p.images, p.lr, *((p.labels,) if soft else ()))
    images_grad, lr_grad, *labels_grad = _pull_once(pullback, torch.ones_like(loss))
    return MatchResult(loss.detach(), images_grad, labels_grad[0] if soft else None, lr_grad)


class _DataGrads:
    """Running sums of dL/dX and dL/dY over the steps' vjps (Y only for soft labels)."""

    def __init__(self, images: Tensor, labels: Tensor | None) -> None:
        self.images, self.labels = images, labels

    @classmethod
    def zeros(cls, p: Problem) -> _DataGrads:
        return cls(
            torch.zeros_like(p.images), torch.zeros_like(p.labels) if p.soft_labels else None
        )

    def add(self, pulled: StepCotangents) -> None:
        """Add one step's u^T dg_i/dX (and u^T dg_i/dY)."""
        with torch.no_grad():
            self.images += pulled.images
            if self.labels is not None:
                self.labels += pulled.labels


def _first_kept(p: Problem) -> int:
    """Index of the first step whose pass-1 graph is kept: the last max(1, keep_graphs) steps are.

    The last step's graph is always kept: pass 1 builds it last, and the walk back needs it first,
    so keeping it costs no extra memory (one graph is alive either way) and saves its rebuild.
    Hence keep_graphs = 0 and 1 are the same method.
    """
    return p.steps - max(1, p.keep_graphs)


def tesla(p: Problem) -> MatchResult:
    """TESLA's two-pass gradient: the first-order truncation of ``unrolled`` (proofs Eq. B3).

    Pass 1 (no graph): theta_T and G = sum_i g_i. Then L, dL/dbeta = -2 (theta_T - target).G / D and
    v = -2 beta (theta_T - target) / D (proofs/b_two_pass.md, Eq. B1). Pass 2 recomputes each
    g_i with a graph over the images (and label logits) only and accumulates v^T dg_i/dX;
    theta_i is rebuilt from the recomputed g_i, so nothing of size T is stored.

    The last K = max(1, keep_graphs) steps are taken with their graphs already in pass 1, and their
    vjps wait for v (:func:`_first_kept`); pass 2 recomputes only the T - K steps before them.
    Memory: K step graphs at the end of pass 1, then one.
    """
    first_kept = _first_kept(p)
    total = {k: torch.zeros_like(v) for k, v in p.start.items()}  # G = sum_i g_i
    params = p.start
    for _, _, g, params in p.run_steps(0, first_kept, p.start):  # leaves params = theta_{T-K}
        total = _axpy(1.0, g, total)
    kept = []  # pullbacks of steps T-K .. T-1, each holding its step graph
    for i in range(first_kept, p.steps):
        g, pullback = p.step_vjp(params, i, wrt_params=False)
        kept.append(pullback)
        with torch.no_grad():
            total = _axpy(1.0, g, total)
            params = _axpy(-p.lr, g, params)  # ends as theta_T
    with torch.no_grad():
        residual = _sub(params, p.target)  # theta_T - target
        loss = _sq_norm(residual) / p.denominator
        lr_grad = -2.0 * _dot(residual, total) / p.denominator
        v = {k: (-2.0 * p.lr / p.denominator) * r for k, r in residual.items()}

    grads = _DataGrads.zeros(p)
    while kept:  # last step first; each graph is freed as soon as it has been pulled back
        grads.add(kept.pop()(v))
    params = p.start
    for i in range(first_kept):
        g, pullback = p.step_vjp(params, i, wrt_params=False)
        grads.add(pullback(v))
        del pullback  # one graph alive at a time
        with torch.no_grad():
            params = _axpy(-p.lr, g, params)
    return MatchResult(loss, grads.images, grads.labels, lr_grad)


def exact(p: Problem) -> MatchResult:
    """Exact adjoint gradient with one step graph alive at a time (proofs/c_adjoint.md, Eqs. C1-C6).

    Forward (no graph): keep theta_i for i a multiple of ``state_stride`` (s); the last
    K = max(1, keep_graphs) steps are taken with their graphs (:func:`_first_kept`), which the walk
    back uses first. Backward: for i from T - 1 down to 0, rebuild theta_i from its checkpoint
    (s > 1: once per segment of s steps) unless step i's graph was kept, and take one vjp of
    (theta, X, Y) -> g_i with cotangent -beta lam_{i+1}::

        (-beta H_i lam, -beta J_X^T lam, -beta J_Y^T lam) = vjp(lam * -beta)
        lam_i = lam_{i+1} - beta H_i lam_{i+1}
        dbeta += -g_i . lam_{i+1}

    Memory: K step graphs + (T/s + s) parameter vectors. Compute: T - K recomputed step graphs;
    s > 1 adds (s - 1)/s of a forward pass of gradients. At K = T nothing is recomputed: the
    FLOPs and the memory of ``unrolled``, and its gradient.
    """
    s = p.state_stride
    first_kept = _first_kept(p)  # steps first_kept .. T-1 keep their pass-1 graphs
    checkpoints: dict[int, Params] = {0: p.start}  # only states of recomputed steps are needed
    params = p.start
    for i, _, _, params in p.run_steps(0, first_kept, p.start):  # leaves params = theta_{T-K}
        if (i + 1) % s == 0 and i + 1 < first_kept:
            checkpoints[i + 1] = params
    kept: dict[int, tuple[Params, Callable[[Params], StepCotangents]]] = {}
    for i in range(first_kept, p.steps):
        g, pullback = p.step_vjp(params, i, wrt_params=True)
        kept[i] = (g, pullback)
        with torch.no_grad():
            params = _axpy(-p.lr, g, params)  # ends as theta_T
    with torch.no_grad():
        residual = _sub(params, p.target)  # theta_T - target
        loss = _sq_norm(residual) / p.denominator
        lam = {name: (2.0 / p.denominator) * r for name, r in residual.items()}  # dL/dtheta_T

    grads = _DataGrads.zeros(p)
    lr_grad = torch.zeros_like(p.lr)
    segment: list[Params] = []  # theta_c .. theta_i, rebuilt from the checkpoint c <= i
    for i in reversed(range(p.steps)):
        if i in kept:
            g, pullback = kept.pop(i)
        else:
            if not segment:
                first = i - i % s
                state = checkpoints.pop(first)
                segment = [state] + [after for *_, after in p.run_steps(first, i, state)]
            g, pullback = p.step_vjp(segment.pop(), i, wrt_params=True)
        pulled = pullback({name: -p.lr * v for name, v in lam.items()})
        del pullback  # the graph is freed; one fewer alive
        grads.add(pulled)
        with torch.no_grad():
            lr_grad -= _dot(g, lam)
            lam = _axpy(1.0, pulled.params, lam)
    return MatchResult(loss, grads.images, grads.labels, lr_grad)


METHODS: dict[str, Callable[[Problem], MatchResult]] = {
    "unrolled": unrolled,
    "tesla": tesla,
    "exact": exact,
}
"""Registry of gradient methods by name; tests and benchmarks loop over it."""


# ----------------------------------------------------------------------------------------------
# Input validation and the public entry point.


def _has_values(t: Tensor) -> bool:
    """False for a tensor with a shape but no data (``FakeTensorMode``, as the memory planner
    runs the methods): checks that read values are skipped for it, the shape checks still run."""
    return not is_fake(t)


def _check_params(name: str, params: object, model: nn.Module) -> Params:
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{name} must be a dict[str, Tensor] of the model's parameters, "
            f"got {type(params).__name__}"
        )
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{name} does not match the model's parameters: missing keys {missing}, "
            f"unexpected keys {unexpected}. Pass dict(model.named_parameters())-style keys."
        )
    out = {}
    for key, ref in expected.items():
        value = params[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a Tensor, got {type(value).__name__}")
        if value.shape != ref.shape:
            raise ValueError(
                f"{name}[{key!r}] has shape {tuple(value.shape)} but the model's "
                f"parameter has shape {tuple(ref.shape)}"
            )
        if not value.is_floating_point():
            raise TypeError(f"{name}[{key!r}] must be floating point, got {value.dtype}")
        out[key] = value.detach()
    return out


def _check_lr(lr: object, like: Tensor) -> Tensor:
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        lr = torch.tensor(float(lr))
    if not isinstance(lr, Tensor) or lr.numel() != 1 or not lr.is_floating_point():
        raise TypeError(f"lr must be a floating-point scalar tensor, got {lr!r}")
    value = float(lr.detach().reshape(())) if _has_values(lr) else 1.0
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"lr must be finite and > 0, got {value}; a negative or NaN student "
            "learning rate means the distillation diverged (parametrise it as exp(log_lr))"
        )
    return lr.detach().reshape(()).to(dtype=like.dtype, device=like.device)


def _check_batches(batches: object, num_images: int, device: torch.device) -> tuple[Tensor, ...]:
    if isinstance(batches, Tensor) and batches.dim() == 2:
        batches = list(batches)
    if not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)):
        raise TypeError("batches must be a sequence of T LongTensors of indices into images")
    if len(batches) == 0:
        raise ValueError("batches is empty: pass at least one index batch (T >= 1 student steps)")
    out = []
    for i, index in enumerate(batches):
        if not isinstance(index, Tensor) or index.dtype != torch.long or index.dim() != 1:
            raise TypeError(
                f"batches[{i}] must be a 1-D int64 (Long) tensor of indices, got "
                f"{getattr(index, 'dtype', type(index).__name__)} of shape "
                f"{tuple(getattr(index, 'shape', ()))}"
            )
        if index.numel() == 0:
            raise ValueError(f"batches[{i}] is empty: every student step needs at least one image")
        lo, hi = (int(index.min()), int(index.max())) if _has_values(index) else (0, 0)
        if lo < 0 or hi >= num_images:
            raise ValueError(
                f"batches[{i}] holds indices in [{lo}, {hi}] but images has "
                f"{num_images} rows: indices must lie in [0, {num_images - 1}]"
            )
        out.append(index.to(device))
    return tuple(out)


def _num_classes(model: nn.Module, params: Params, buffers: Params, images: Tensor) -> int:
    """K, from the model's output on one image (a cheap forward without a graph)."""
    with torch.no_grad(), _batch_statistics_only(model):
        out = functional_call(model, (params, buffers), (images[:2],), strict=True)
    if out.dim() != 2:
        raise ValueError(
            f"the model must map (N, ...) images to (N, K) logits, got an output of "
            f"shape {tuple(out.shape)}"
        )
    return out.shape[1]


def _check_count(name: str, value: object, minimum: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} ({meaning}), got {value!r}")


def make_problem(
    model,
    start,
    target,
    images,
    labels,
    lr,
    batches,
    augment=None,
    state_stride: int = 1,
    keep_graphs: int = 0,
) -> Problem:
    """Validate the arguments of :func:`match_trajectory` and bundle them as a :class:`Problem`.

    Raises ``TypeError``/``ValueError`` naming the offending argument and the fix.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module skeleton, got {type(model).__name__}")
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() < 2:
        raise TypeError(
            "images must be a floating-point tensor of shape (N, C, H, W), got "
            f"{getattr(images, 'dtype', type(images).__name__)} of shape "
            f"{tuple(getattr(images, 'shape', ()))}"
        )
    if images.shape[0] == 0:
        raise ValueError("images is empty (N = 0)")
    if _has_values(images) and not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf; check the last image update (lower lr_img)")
    images = images.detach()
    start = _check_params("start", start, model)
    target = _check_params("target", target, model)
    for key, value in start.items():
        if value.dtype != images.dtype or value.device != images.device:
            raise TypeError(
                f"start[{key!r}] is {value.dtype} on {value.device} but images are "
                f"{images.dtype} on {images.device}: move both to one dtype/device"
            )
        other = target[key]
        if other.dtype != value.dtype or other.device != value.device:
            raise TypeError(
                f"target[{key!r}] is {other.dtype} on {other.device} but start is "
                f"{value.dtype} on {value.device}"
            )
    if _has_values(start[next(iter(start))]) and float(_sq_norm(_sub(start, target))) == 0.0:
        raise ValueError(
            "start and target are identical, so ||start - target||^2 = 0 and the "
            "normalised loss is undefined: pick target = a later expert checkpoint"
        )
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    lr = _check_lr(lr, images)
    batches = _check_batches(batches, images.shape[0], images.device)
    if augment is not None and not callable(augment):
        raise TypeError("augment must be None or a callable (x, step) -> x")
    _check_count("state_stride", state_stride, 1, "keep every state_stride-th student state")
    _check_count(
        "keep_graphs", keep_graphs, 0, "the number of final steps whose pass-1 graphs are kept"
    )

    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a Tensor, got {type(labels).__name__}")
    labels = labels.detach()
    num_classes = _num_classes(model, start, buffers, images)
    n = images.shape[0]
    if labels.is_floating_point():
        if labels.shape != (n, num_classes):
            raise ValueError(
                f"float labels are label logits of shape (N, K) = ({n}, "
                f"{num_classes}), got {tuple(labels.shape)}"
            )
        if _has_values(labels) and not torch.isfinite(labels).all():
            raise ValueError("label logits contain NaN or inf")
        labels = labels.to(dtype=images.dtype, device=images.device)
    elif labels.dtype == torch.long:
        if labels.shape != (n,):
            raise ValueError(
                f"int labels are class indices of shape (N,) = ({n},), got {tuple(labels.shape)}"
            )
        lo, hi = (int(labels.min()), int(labels.max())) if _has_values(labels) else (0, 0)
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels hold classes in [{lo}, {hi}] but the model has "
                f"{num_classes} outputs: classes must lie in [0, {num_classes - 1}]"
            )
        labels = labels.to(images.device)
    else:
        raise TypeError(
            f"labels must be int64 class indices (N,) or float logits (N, K), got {labels.dtype}"
        )
    return Problem(
        model,
        buffers,
        start,
        target,
        images,
        labels,
        lr,
        batches,
        augment,
        state_stride,
        min(keep_graphs, len(batches)),  # more graphs than steps: keep them all
    )


def match_trajectory(
    model: nn.Module,
    start: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    images: Tensor,
    labels: Tensor,
    lr: Tensor | float,
    batches: Sequence[Tensor],
    method: str = "tesla",
    augment: StepAugment | None = None,
    *,
    state_stride: int = 1,
    keep_graphs: int = 0,
) -> MatchResult:
    """Trajectory-matching loss L (proofs/README.md) and its gradients w.r.t. images, labels, lr.

    Args:
        model: skeleton ``nn.Module``; its parameters are replaced by ``start`` etc. through
            ``functional_call`` (strict: every parameter must be given). Buffers are read, never
            written: train-mode BatchNorm uses batch statistics.
        start, target: expert checkpoints theta*_t and theta*_{t+M}, name -> tensor.
        images: (N, C, H, W) synthetic images X.
        labels: (N,) int64 classes (hard) or (N, K) float label logits Y (soft: the inner loss is
            cross-entropy against softmax(Y)).
        lr: scalar tensor, the student learning rate beta > 0.
        batches: T LongTensors of indices into ``images``, one per student step.
        method: a key of :data:`METHODS`: "unrolled", "tesla" or "exact".
        augment: optional ``(x, step) -> x``; must give the same transform every time it is called
            with the same step (the two-pass and adjoint methods call it twice per step).
        state_stride: "exact" only: keep every s-th student state and recompute the others.
        keep_graphs: "tesla" and "exact": k >= 0, the number of final steps whose graphs, built in
            the first pass, are kept for the walk back instead of being rebuilt (trades memory for
            time). The last step's graph is always kept (its vjp is the first one needed), so
            k = 0 and k = 1 are the same method, today's default; k >= T keeps every graph (k
            larger than T is clamped to T). Costs k step graphs of memory and saves k - 1 step
            rebuilds; at k = T "exact" does the work and holds the memory of "unrolled". The
            gradient does not depend on k (up to rounding). "unrolled" ignores it: it keeps all T
            graphs anyway.

    Returns:
        :class:`MatchResult` (loss, images_grad, labels_grad or None, lr_grad), all detached.
        Inputs are not modified.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {sorted(METHODS)}")
    problem = make_problem(
        model, start, target, images, labels, lr, batches, augment, state_stride, keep_graphs
    )
    with _batch_statistics_only(model):
        return METHODS[method](problem)

"""How far one gradient is from another, on matching problems drawn like distillation's.

``tesla`` returns a first-order truncation of the MTT gradient and ``exact`` the gradient itself
(proofs/b_two_pass.md, proofs/c_adjoint.md). :func:`agreement` measures the distance between two
:class:`~tesla_func.matching.MatchResult` s (g = dL/dX over all images, d = dL/dbeta)::

    cosine = <g_a, g_b> / (|g_a| |g_b|)        relative error = |g_a - g_b| / |g_b|
    lr relative error = |d_a - d_b| / |d_b|    lr sign agreement = [sign d_a = sign d_b]

and :func:`draw_segment` draws the synthetic side of a problem the way a distillation iteration
does: random real images of every class, non-overlapping minibatches, replayed DSA.

Precision. A :class:`Case` holds every input of one matching problem as drawn (float32) and
solves it in any precision from the *same* numbers (casting float32 up to float64 is exact), so
that :func:`precision_errors` of a float32 result against the float64 ``unrolled`` one measure
rounding and nothing else. The float32 error of a ReLU network is not a smooth function of the
problem: its gradient is piecewise smooth, and a pre-activation within rounding of 0 takes the
other side of the kink in one precision than in the other, so that unit's gradient and its
Hessian terms are switched off in one computation and on in the other.
:func:`activation_sign_flips` counts those units along the student trajectory, the way a method
computes it; :func:`drawn_case` and :func:`expert_case` make the problems.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tesla_func.augment import DSA, FAMILIES, ReplayedDSA
from tesla_func.data import Dataset
from tesla_func.labels import near_one_hot
from tesla_func.matching import MatchResult, match_trajectory
from tesla_func.models import ConvNet, ConvNetConfig, init_params
from tesla_func.problem import make_problem
from tesla_func.sampling import draw_minibatches, per_class_indices
from tesla_func.types import Params
from tesla_func.validation import batch_statistics_only


def relative_error(a: Tensor | None, b: Tensor | None) -> float:
    """|a - b| / |b| over every element, in float64: inf when b is 0, NaN when either is None
    (class labels have no gradient)."""
    if a is None or b is None:
        return math.nan
    a, b = a.double().flatten(), b.double().flatten()
    norm = float(b.norm())
    return float((a - b).norm()) / norm if norm else math.inf


def agreement(approx: MatchResult, reference: MatchResult) -> dict[str, float]:
    """How close ``approx``'s gradients are to ``reference``'s (see the module docstring):
    ``images_cosine``, ``images_relative_error``, ``lr_relative_error`` (inf when the
    reference's is 0) and ``lr_sign_agreement`` (1.0 or 0.0)."""
    a, b = approx.images_grad.flatten(), reference.images_grad.flatten()
    da, db = float(approx.beta_grad), float(reference.beta_grad)
    return {
        "images_cosine": float(a @ b / (a.norm() * b.norm())),
        "images_relative_error": relative_error(a, b),
        "lr_relative_error": relative_error(approx.beta_grad, reference.beta_grad),
        "lr_sign_agreement": float(math.copysign(1, da) == math.copysign(1, db)),
    }


@dataclass(frozen=True)
class Segment:
    """The synthetic side of a matching problem with up to ``len(batches)`` student steps."""

    images: Tensor  # (N, C, H, W) random real images, ipc per class, class-major
    labels: Tensor  # (N,) their classes
    batches: tuple[Tensor, ...]  # (batch,) index tensors; a T-step problem uses the first T
    augment: ReplayedDSA | None  # DSA parameters of every step, replayed in every pass


def draw_segment(
    dataset: Dataset,
    ipc: int,
    batch: int,
    max_steps: int,
    generator: torch.Generator,
    *,
    dsa: bool = True,
    families: Sequence[str] = FAMILIES,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Segment:
    """Draw images, minibatches and DSA parameters for up to ``max_steps`` steps from
    ``generator`` (in that order), as a distillation iteration would; each step's DSA family is
    drawn from ``families``."""
    k = dataset.info.num_classes
    index = per_class_indices(dataset.train_labels, ipc, generator, k, dataset.info.class_names)
    n = len(index)
    if batch > n:
        raise ValueError(f"batch {batch} is larger than the synthetic set (ipc {ipc} x {k} "
                         f"classes = {n} images)")
    batches, _ = draw_minibatches(torch.zeros(0, dtype=torch.long), n, batch, max_steps,
                                  generator)
    augment = (DSA(families=tuple(families)).replayable([batch] * max_steps, generator,
                                                         device=device, dtype=dtype)
               if dsa else None)
    return Segment(
        dataset.train_images[index].to(device, dtype),
        dataset.train_labels[index].to(device),
        tuple(b.to(device) for b in batches),
        augment,
    )


# ----------------------------------------------------------------------------------------------
# Precision: one problem solved in two precisions from the same numbers.

ACTIVATIONS = (nn.ReLU, nn.Softplus)  # the layers whose input signs activation_sign_flips reads
PATHS = {"unrolled": "unrolled", "tesla": "value", "exact": "value"}
"""How each method computes the student states theta_i (:func:`activation_sign_flips`): inside
one differentiable loop (``unrolled``) or step by step as plain values (``tesla`` and ``exact``
in their first pass, and the same bits again when they rebuild a step)."""


@dataclass(frozen=True)
class Case:
    """The inputs of one matching problem (:func:`~tesla_func.matching.match_trajectory`), as
    drawn, in the low precision. :meth:`solve` casts them to the precision asked for, so a float64
    solve sees exactly the float32 numbers and the two results differ by rounding only."""

    model: nn.Module  # skeleton; its parameters come from start (functional_call)
    start: Params  # theta_0
    target: Params
    images: Tensor  # (N, C, H, W)
    labels: Tensor  # (N,) int64 classes, or (N, K) float label logits
    beta: float  # the student learning rate
    batches: tuple[Tensor, ...]  # index tensors of up to T_max steps; a T-step solve uses T
    augment: ReplayedDSA | None  # drawn for every step of ``batches`` (applied in x's dtype)

    def inputs(self, dtype: torch.dtype, steps: int | None = None) -> dict:
        """match_trajectory's arguments in ``dtype``, for the first ``steps`` steps (all: None).
        The DSA parameters need no cast: DSA.apply casts them to the images' dtype."""
        def cast(x: Tensor) -> Tensor:
            return x.to(dtype) if x.is_floating_point() else x

        return {
            "model": copy.deepcopy(self.model).to(dtype),
            "start": {k: cast(v) for k, v in self.start.items()},
            "target": {k: cast(v) for k, v in self.target.items()},
            "images": cast(self.images),
            "labels": cast(self.labels),
            "beta": torch.tensor(self.beta, dtype=dtype, device=self.images.device),
            "batches": self.batches[:steps],
            "augment": self.augment,
        }

    def solve(self, method: str, dtype: torch.dtype, steps: int | None = None) -> MatchResult:
        """``match_trajectory`` of this problem with ``method`` in ``dtype``."""
        return match_trajectory(**self.inputs(dtype, steps), method=method)

    def to(self, device: torch.device | str) -> Case:
        """The same problem with every tensor on ``device``."""
        def move(params: Params) -> Params:
            return {k: v.to(device) for k, v in params.items()}

        return dataclasses.replace(
            self, model=copy.deepcopy(self.model).to(device), start=move(self.start),
            target=move(self.target), images=self.images.to(device),
            labels=self.labels.to(device), batches=tuple(b.to(device) for b in self.batches))


def precision_errors(result: MatchResult, reference: MatchResult) -> dict[str, float]:
    """:func:`relative_error` of each of ``result``'s gradients against ``reference``'s:
    ``images_error`` (dL/dX), ``labels_error`` (dL/dY; NaN for class labels) and ``beta_error``
    (dL/dbeta)."""
    return {"images_error": relative_error(result.images_grad, reference.images_grad),
            "labels_error": relative_error(result.labels_grad, reference.labels_grad),
            "beta_error": relative_error(result.beta_grad, reference.beta_grad)}


def _activation_inputs(model: nn.Module, params: Params, x: Tensor) -> list[Tensor]:
    """The inputs of every activation layer (:data:`ACTIVATIONS`) of one forward pass."""
    seen: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
             for m in model.modules() if isinstance(m, ACTIVATIONS)]
    try:
        with torch.no_grad():
            functional_call(model, params, (x,), strict=False)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _student_states(case: Case, dtype: torch.dtype, steps: int, path: str) -> list[Params]:
    """theta_0 .. theta_{T-1} of ``case`` in ``dtype``, computed along ``path`` (:data:`PATHS`):
    ``"value"`` as tesla's and exact's first pass does (Problem.run_steps), ``"unrolled"`` by
    the differentiable step of ``unrolled`` (Problem.step_grad), values only."""
    args = case.inputs(dtype, steps)
    with batch_statistics_only(args["model"]):
        p = make_problem(**args)
        if path == "value":
            return [theta for _, theta, _, _ in p.run_steps(0, steps, p.start)]
        states, theta = [], p.start
        for i in range(steps):
            states.append(theta)
            g = p.step_grad(theta, p.images, p.labels, i)
            with torch.no_grad():
                theta = {k: theta[k] - p.beta * g[k] for k in theta}
        return states


def activation_sign_flips(
    case: Case,
    steps: int,
    methods: Sequence[str] = ("unrolled", "exact"),
    *,
    low: torch.dtype = torch.float32,
    high: torch.dtype = torch.float64,
) -> dict[str, list[int]]:
    """Per method and student step i < ``steps``: how many activation inputs (every unit of every
    ReLU or Softplus layer, for every row of the step's augmented minibatch) have another sign in
    ``low`` than in ``high`` precision, each precision at its own student state theta_i: in
    ``low`` computed the way the method computes it (:data:`PATHS`), in ``high`` the way the
    reference ``unrolled`` does (computed once for all methods).

    Where a ReLU's input changes sign, the two precisions differentiate different pieces of a
    piecewise smooth function: the low-precision gradient can then be far from the reference
    whatever the method. Softplus has no kink, so its flips are harmless (the control).
    """
    def inputs(dtype: torch.dtype, states: list[Params]) -> list[list[Tensor]]:
        model = copy.deepcopy(case.model).to(dtype)
        out = []
        for i in range(steps):
            x = case.images[case.batches[i]].to(dtype)
            x = case.augment(x, i) if case.augment is not None else x
            out.append(_activation_inputs(model, states[i], x))
        return out

    reference = inputs(high, _student_states(case, high, steps, PATHS["unrolled"]))
    by_path = {}
    for path in dict.fromkeys(PATHS[m] for m in methods):
        ours = inputs(low, _student_states(case, low, steps, path))
        by_path[path] = [sum(int(((a > 0) != (b > 0)).sum()) for a, b in zip(mine, theirs))
                         for mine, theirs in zip(ours, reference)]
    return {m: by_path[PATHS[m]] for m in methods}


def with_activation(model: nn.Module, activation: str) -> nn.Module:
    """A copy of ``model`` with every ReLU replaced: ``"relu"`` (unchanged) or ``"softplus"``
    (Softplus(beta=20): smooth, and within 0.035 of ReLU everywhere)."""
    if activation not in ("relu", "softplus"):
        raise ValueError(f"activation must be 'relu' or 'softplus', got {activation!r}")
    model = copy.deepcopy(model)
    if activation == "softplus":
        for module in model.modules():
            for name, child in module.named_children():
                if isinstance(child, nn.ReLU):
                    setattr(module, name, nn.Softplus(beta=20.0))
    return model


def drawn_case(
    generator: torch.Generator,
    arch: ConvNetConfig,
    *,
    images: int,
    batch: int,
    steps: int,
    families: Sequence[str] = (),
    soft_labels: bool = False,
    activation: str = "relu",
    beta: float = 0.01,
    target_scale: float = 0.01,
) -> Case:
    """A drawn problem (float32, CPU): the ConvNet ``arch`` at a fresh initialisation as start,
    target = start + ``target_scale`` N(0, 1) entry by entry, ``images`` N(0, 1) images of class
    i mod K (or, with ``soft_labels``, near-one-hot label logits (confidence 0.9) plus N(0, 1/4)
    noise, like learned ones), ``steps`` non-overlapping minibatches of ``batch`` rows and, if
    ``families`` is not empty, DSA drawn from those families; drawn from ``generator`` in that
    order."""
    model = with_activation(ConvNet(arch), activation)
    start = init_params(model, generator)
    target = {k: v + target_scale * torch.randn(v.shape, generator=generator)
              for k, v in start.items()}
    k = arch.num_classes
    x = torch.randn(images, arch.channels, arch.image_size, arch.image_size, generator=generator)
    classes = torch.arange(images) % k
    labels = classes
    if soft_labels:
        noise = 0.5 * torch.randn(images, k, generator=generator)
        labels = near_one_hot(classes, k, 0.9, torch.float32) + noise
    batches, _ = draw_minibatches(torch.zeros(0, dtype=torch.long), images, batch, steps,
                                  generator)
    augment = (DSA(families=tuple(families)).replayable([batch] * steps, generator)
               if families else None)
    return Case(model, start, target, x, labels, beta, tuple(batches), augment)


def expert_case(
    segment: Segment,
    model: nn.Module,
    start: Params,
    target: Params,
    *,
    soft_labels: bool = False,
    activation: str = "relu",
    beta: float = 0.01,
    generator: torch.Generator | None = None,
) -> Case:
    """A problem on an expert segment (start theta*_t, target theta*_{t+M}) with the synthetic
    side ``segment`` (:func:`draw_segment`, float32); ``soft_labels``: its classes as near-one-hot
    logits plus N(0, 1/4) noise drawn from ``generator``."""
    labels = segment.labels
    if soft_labels:
        k = model.config.num_classes if hasattr(model, "config") else int(labels.max()) + 1
        noise = 0.5 * torch.randn(len(labels), k, generator=generator)
        labels = near_one_hot(labels, k, 0.9, torch.float32) + noise.to(labels.device)
    return Case(with_activation(model, activation), start, target, segment.images, labels, beta,
                segment.batches, segment.augment)

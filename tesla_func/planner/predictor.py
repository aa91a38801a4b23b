"""Predicting the memory and FLOPs of one distillation iteration: the matching call on fake tensors
(:class:`Predictor`, with its lines in T and in keep_graphs) and what the iteration holds besides
(:func:`held_bytes`, :func:`update_peak_bytes`, :func:`teacher_peak_bytes`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tesla_func.augment import DSA, FAMILIES, ReplayedDSA
from tesla_func.labels import LABEL_STRATEGIES, LabelStrategy
from tesla_func.matching import METHODS, match_trajectory
from tesla_func.memory import Cost, measure_peak_memory, predict_cost
from tesla_func.planner.config import PlanConfig


# Seconds a step of a measured call may take before the rest are predicted instead: about what
# predicting one step takes (0.3-0.8 s here: a millisecond of Python for each of its ~1000
# operators, whatever the sizes). A step of the paper's CIFAR-10 call (width 128, batch 100)
# takes 1-2 s on a CPU core.
PREDICT_ABOVE_S = 0.5


@dataclass(frozen=True)
class LabelKind:
    """What a label strategy of the distillation puts in the matching call and keeps between calls.

    soft:    the call gets (N, K) float logits (and returns their gradient), else (N,) classes
    learned: the logits are learned: their SGD momentum is held and they are updated
    teacher:  the logits come from a teacher forward on all N images every iteration (SLA)
    images:  the images are learned (False for SLA on frozen real images)
    """

    soft: bool
    learned: bool
    teacher: bool
    images: bool = True


    @classmethod
    def of(cls, strategy: LabelStrategy) -> LabelKind:
        """What a registered strategy holds: a teacher's or learned labels are logits."""
        teacher = strategy.teacher_epoch is not None
        return cls(soft=teacher or strategy.learns_logits, learned=strategy.learns_logits,
                   teacher=teacher, images=strategy.learns_images)


def label_kind(name: str) -> LabelKind:
    """The :class:`LabelKind` of the strategy ``name`` of tesla_func.labels.LABEL_STRATEGIES."""
    return LabelKind.of(LABEL_STRATEGIES[name])


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------------------------
# Predicting one matching call


class Predictor:
    """Predicted costs of the matching call of one :class:`PlanConfig`, cached by (method, T, B).

    ``call(method, steps, batch)`` predicts directly for T up to ``cfg.extrapolate_above`` and by
    linearity from two short T above it; ``direct(...)`` always runs the whole call.

    ``measure_on`` (a device): every call's peak is *measured* there instead, on real tensors of
    the planned shapes (FLOPs are then not counted: 0; the model is ``cfg.model``, a real
    skeleton on that device: :class:`tesla_func.planner.auto.RunShape`). On CPU the bytes are the
    prediction's, at the cost of the call's own arithmetic instead of about a millisecond per
    operator: what a run choosing its own keep_graphs at start-up uses. On CUDA they are the
    allocator's. Once a measured call has taken longer per step than predicting one does
    (:data:`PREDICT_ABOVE_S`: large networks on a CPU), the rest are predicted.
    """

    def __init__(self, cfg: PlanConfig, *, measure_on: str | torch.device | None = None) -> None:
        self.cfg = cfg
        self.measure_on = None if measure_on is None else torch.device(measure_on)
        self.predicting = measure_on is None  # measured calls turned out slower than predicting
        self.model = cfg.skeleton()
        self.kind = label_kind(cfg.distill.label_strategy)
        self._cache: dict[tuple, Cost] = {}
        self._family: dict[int, str | None] = {}

    # -- inputs (meta tensors: the prediction turns them into CPU tensors without data) ---------

    def _params(self) -> dict[str, Tensor]:
        return {k: torch.empty_like(p, device="meta") for k, p in self.model.named_parameters()}

    def augment(self, steps: int, batch: int, family: str | None) -> ReplayedDSA | None:
        """The DSA draws of a T-step call, every step of ``family`` (None: no augmentation)."""
        if family is None:
            return None
        dsa, gen = DSA(), torch.Generator().manual_seed(self.cfg.distill.seed)
        draws = tuple(
            dsa.sample(batch, gen, family=family, device="meta", dtype=self.cfg.torch_dtype)
            for _ in range(steps)
        )
        return ReplayedDSA(dsa=dsa, params=draws)

    def arguments(self, steps: int, batch: int, family: str | None) -> dict[str, Any]:
        """Keyword arguments of ``match_trajectory`` with the planned shapes, on the meta device."""
        cfg, s, dt = self.cfg, self.cfg.shape, self.cfg.torch_dtype
        n = cfg.num_images
        labels = (
            torch.empty(n, s.num_classes, dtype=dt, device="meta")
            if self.kind.soft
            else torch.empty(n, dtype=torch.long, device="meta")
        )
        return {
            "model": self.model,
            "start": self._params(),
            "target": self._params(),
            "images": torch.empty(n, s.channels, s.image_size, s.image_size, dtype=dt,
                                  device="meta"),
            "labels": labels,
            "beta": torch.empty((), dtype=dt, device="meta"),
            "batches": [torch.empty(batch, dtype=torch.long, device="meta")] * steps,
            "augment": self.augment(steps, batch, family),
        }

    def keep(self, method: str, keep: int | None = None) -> int | None:
        """The keep_graphs of ``method``'s call: ``keep``, else the run's; None for a method that
        takes none (:class:`tesla_func.matching.Method`). A run's "auto" is predicted at k = 0
        (what it picks depends on the device: the plan's ``max_keep_graphs``)."""
        if not METHODS[method].takes_keep_graphs:
            return None
        keep = self.cfg.distill.keep_graphs if keep is None else keep
        return 0 if keep == "auto" else keep

    def method_kwargs(self, method: str, keep: int | None = None) -> dict[str, Any]:
        """Options of ``match_trajectory`` for ``method``, as the distillation passes them: the
        run's state_stride and keep_graphs (``keep`` instead, if given) where the method takes
        them and are not the default, and its microbatch_size when set."""
        run = self.cfg.distill
        kw: dict[str, Any] = {"method": method}
        if METHODS[method].takes_state_stride:
            kw["state_stride"] = run.state_stride
        if self.keep(method, keep):  # 0: match_trajectory's default
            kw["keep_graphs"] = self.keep(method, keep)
        if run.microbatch_size is not None:
            kw["microbatch_size"] = run.microbatch_size
        return kw

    def family(self, batch: int) -> str | None:
        """The DSA family whose one-step call (unrolled, T = 1) peaks highest; None without DSA."""
        if not self.cfg.distill.dsa:
            return None
        if batch not in self._family:
            costs = {f: self._run("unrolled", 1, batch, f, None) for f in FAMILIES}
            worst = max(FAMILIES, key=lambda f: costs[f].peak_bytes)  # the first of equal ones
            self._family[batch] = worst
            self._cache[("direct", "unrolled", 1, batch, 0)] = costs[worst]
        return self._family[batch]

    # -- the call ---------------------------------------------------------------------------------

    def direct(self, method: str, steps: int, batch: int | None = None,
               keep: int | None = None) -> Cost:
        """The whole T-step call run on fake tensors (``keep``: keep_graphs instead of the
        config's)."""
        batch = batch or self.cfg.batch
        key = ("direct", method, steps, batch, self.keep(method, keep) or 0)
        if key not in self._cache:
            self._cache[key] = self._run(method, steps, batch, self.family(batch), keep)
        return self._cache[key]

    def _run(self, method: str, steps: int, batch: int, family: str | None,
             keep: int | None) -> Cost:
        """One call's cost: predicted on fake tensors, or measured (``measure_on``)."""
        args, kwargs = self.arguments(steps, batch, family), self.method_kwargs(method, keep)
        if self.predicting:
            return predict_cost(match_trajectory, **args, **kwargs)[1]
        tic = time.perf_counter()
        real = self._materialize(args, steps, batch, family)
        peak = measure_peak_memory(match_trajectory, **real, **kwargs, device=self.measure_on)[1]
        self.predicting = (time.perf_counter() - tic) / steps > PREDICT_ABOVE_S
        return Cost(peak.peak_bytes, 0)  # FLOPs are not counted: they would double the cost

    def _materialize(self, args: dict[str, Any], steps: int, batch: int,
                     family: str | None) -> dict[str, Any]:
        """``arguments`` as real tensors on ``measure_on`` (values drawn from the seed: the cost
        depends on shapes only), with the run's own model skeleton."""
        device, dt = self.measure_on, self.cfg.torch_dtype
        gen = torch.Generator().manual_seed(self.cfg.distill.seed)

        def draw(t: Tensor) -> Tensor:
            return torch.randn(t.shape, generator=gen, dtype=dt).to(device)

        start = {k: draw(v) for k, v in args["start"].items()}
        labels = args["labels"]
        n, k = labels.shape[0], self.cfg.shape.num_classes
        return {
            **args,
            "model": self.cfg.model,
            "start": start,
            "target": {name: v + 0.01 * draw(v) for name, v in start.items()},
            "images": draw(args["images"]),
            "labels": draw(labels) if self.kind.soft else (torch.arange(n) % k).to(device),
            "beta": torch.tensor(0.01, dtype=dt, device=device),
            "batches": [torch.arange(batch, device=device)] * steps,
            "augment": None if family is None else ReplayedDSA(dsa=DSA(), params=tuple(
                DSA().sample(batch, gen, family=family, device=device, dtype=dt)
                for _ in range(steps))),
        }

    def stride(self, method: str) -> int:
        """s: the period in T (and in keep_graphs) of the call's cost (exact's state_stride)."""
        return self.cfg.distill.state_stride if METHODS[method].takes_state_stride else 1

    def anchors(self, method: str, steps: int, keep: int | None = None) -> tuple[int, int]:
        """Two short T whose calls extend linearly to ``steps`` (same residue modulo the stride)."""
        s = self.stride(method)
        # Every method is affine in T from T = 3 on (tesla's first two steps differ); with a
        # stride s > 1, exact is affine along each residue class modulo s past the first segment;
        # the last k = keep_graphs steps come after them.
        low = (3 if s == 1 else s + 3) + (self.keep(method, keep) or 0)
        a = low + (steps - low) % s
        return a, a + s

    def call(self, method: str, steps: int, batch: int | None = None,
             keep: int | None = None) -> tuple[Cost, bool]:
        """(predicted cost, extrapolated?) of a T-step call."""
        if steps <= self.cfg.extrapolate_above:
            return self.direct(method, steps, batch, keep), False
        a, b = self.anchors(method, steps, keep)
        if steps <= b:
            return self.direct(method, steps, batch, keep), False
        ca, cb = self.direct(method, a, batch, keep), self.direct(method, b, batch, keep)
        cost = _extend(ca, cb, a, b, steps)
        if cost is None:  # not affine after all: do not guess
            return self.direct(method, steps, batch, keep), False
        return cost, True

    def step_inputs_bytes(self, steps: int, batch: int | None = None) -> int:
        """Bytes of the per-iteration inputs that grow with T: index batches and DSA draws."""
        batch = batch or self.cfg.batch
        family = self.family(batch)
        per_step = batch * 8  # int64 indices
        if family is not None:
            one = self.augment(1, batch, family).params[0]
            per_step += sum(_nbytes(v) for v in one.values.values())
        return steps * per_step

    @property
    def first_keep(self) -> int:
        """The smallest k > 0 whose call differs from the call at k = 0: 2 where a step runs whole
        (its last graph is kept anyway, so k = 1 is the call of k = 0), 1 where the run's
        microbatches split it (k = 0 keeps only the last chunk's graph, k = 1 the whole step's)."""
        micro = self.cfg.distill.microbatch_size
        return 1 if micro is not None and micro < self.cfg.batch else 2

    def keep_line(self, method: str, steps: int) -> KeepLine:
        """The T-step call's peak and FLOPs as lines in keep_graphs k (first_keep <= k < T), from
        the call at k = 0 and three short calls.

        Every kept step holds one step graph more and rebuilds one step fewer, so from
        :attr:`first_keep` on the cost moves by the same amount per kept step, at every T (with a
        stride s, per s kept steps). The line's value at k = 2 is the call at k = 0 plus
        what keeping 2 steps adds at the short T = b (the longer anchor of k = 0), and its slope
        is read at b from k = 2 and k = 2 + s. Tests check it against direct prediction: equal
        for 2 <= k < T, and at k = T for exact with s = 1 (tesla at k = T holds one parameter
        vector less than the line; with s > 1, k off the residue of 2 modulo s is within a
        parameter vector)."""
        s = self.stride(method)
        _, b = self.anchors(method, steps, keep=0)
        zero, two, more = (self.direct(method, b, keep=k) for k in (0, 2, 2 + s))
        base, _ = self.call(method, steps, keep=0)
        return KeepLine(
            peak=base.peak_bytes + two.peak_bytes - zero.peak_bytes,
            flops=base.flops + two.flops - zero.flops,
            peak_per_keep=(more.peak_bytes - two.peak_bytes) / s,
            flops_per_keep=(more.flops - two.flops) / s,
            first=self.first_keep,
        )


@dataclass(frozen=True)
class KeepLine:
    """A T-step call's predicted peak bytes and FLOPs against keep_graphs k >= ``first`` (a
    line)."""

    peak: int  # at k = 2, bytes
    flops: int  # at k = 2
    peak_per_keep: float  # bytes per further kept step graph
    flops_per_keep: float  # FLOPs per further kept step (negative: one step rebuild fewer)
    first: int = 2  # the line holds from this k on (Predictor.first_keep)

    def at(self, keep: int) -> Cost:
        return Cost(round(self.peak + (keep - 2) * self.peak_per_keep),
                    round(self.flops + (keep - 2) * self.flops_per_keep))

    def largest(self, room: float, steps: int) -> int:
        """The largest k in {0} and first .. T whose peak on the line is at most ``room`` bytes
        (0 when not even k = first is: k = 0 is checked by the caller)."""
        if self.at(self.first).peak_bytes > room:
            return 0
        if self.peak_per_keep <= 0:
            return steps
        return min(steps, 2 + math.floor((room - self.peak) / self.peak_per_keep))


def _extend(ca: Cost, cb: Cost, a: int, b: int, steps: int) -> Cost | None:
    """Cost at ``steps`` on the line through (a, ca) and (b, cb); None if not a whole number."""

    def line(x: int, y: int) -> int | None:
        num = (y - x) * (steps - a)
        return x + num // (b - a) if num % (b - a) == 0 else None

    peak, flops = line(ca.peak_bytes, cb.peak_bytes), line(ca.flops, cb.flops)
    ops = {op: line(ca.flops_by_op.get(op, 0), cb.flops_by_op.get(op, 0))
           for op in {*ca.flops_by_op, *cb.flops_by_op}}
    if peak is None or flops is None or None in ops.values():
        return None
    return Cost(peak, flops, ops)


# ----------------------------------------------------------------------------------------------
# What the iteration holds besides the call


def held_bytes(cfg: PlanConfig, model: nn.Module | None = None) -> dict[str, int]:
    """Bytes one distillation iteration holds across the matching call, by item (T-independent;
    the step inputs that grow with T are :meth:`Predictor.step_inputs_bytes`)."""
    model = model if model is not None else cfg.skeleton()
    s, kind = cfg.shape, label_kind(cfg.distill.label_strategy)
    size = torch.empty((), dtype=cfg.torch_dtype).element_size()
    n = cfg.num_images
    images = n * s.channels * s.image_size**2 * size
    params = sum(_nbytes(p) for p in model.parameters())
    buffers = sum(_nbytes(b) for b in model.buffers())
    logits = n * s.num_classes * size
    return {
        "synthetic images": images,
        "image momentum": images,
        "labels": logits if kind.soft else n * 8,
        "label momentum": logits if kind.learned else 0,
        "expert start and target": 2 * params,
        "model skeleton": params + buffers,
        "further expert checkpoints": cfg.experts_on_device * params,
    }


def update_peak_bytes(cfg: PlanConfig) -> int:
    """Peak above the held memory while the SGD update runs after the call.

    The call's gradients are alive (dL/dX, and dL/dY for soft labels); the distillation's one
    SGD step (:func:`tesla_func.optim.sgd`: ``buf = mu * buf + g; p = p - lr * buf`` over every
    learned tensor at once) holds the new momenta and the new values of all of them before the
    old ones are freed: 2 copies of what is updated.
    """
    s, kind = cfg.shape, label_kind(cfg.distill.label_strategy)
    size = torch.empty((), dtype=cfg.torch_dtype).element_size()
    n = cfg.num_images
    images = n * s.channels * s.image_size**2 * size
    logits = n * s.num_classes * size
    grads = images + (logits if kind.soft else 0)
    updated = (images if kind.images else 0) + (logits if kind.learned else 0)
    return grads + 2 * updated


def teacher_peak_bytes(cfg: PlanConfig, model: nn.Module | None = None) -> int:
    """SLA: peak of the teacher's forward on all N images (no graph, eval mode) above its output
    (the logits, counted as held labels). 0 for strategies without a teacher."""
    if not label_kind(cfg.distill.label_strategy).teacher:
        return 0
    model = model if model is not None else cfg.skeleton()
    s, n, dt = cfg.shape, cfg.num_images, cfg.torch_dtype

    def teacher(model: nn.Module, params: dict[str, Tensor], images: Tensor) -> Tensor:
        model.eval()
        with torch.no_grad():
            return functional_call(model, params, (images,), strict=True)

    params = {k: torch.empty_like(p, device="meta") for k, p in model.named_parameters()}
    images = torch.empty(n, s.channels, s.image_size, s.image_size, dtype=dt, device="meta")
    _, cost = predict_cost(teacher, model, params, images)
    return max(cost.peak_bytes - n * s.num_classes * torch.empty((), dtype=dt).element_size(), 0)



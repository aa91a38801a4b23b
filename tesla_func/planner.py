"""Plan a distillation before running it: predicted peak memory and FLOPs of each gradient method,
and what else one distillation iteration holds, for any dataset, model and size, on a CPU.

    from tesla_func.planner import PlanConfig, plan, plan_markdown
    ds = plan(PlanConfig(dataset="imagenet64", model="convnetd4", ipc=1, batch_syn=100,
                         syn_steps=(50,), device_memory="48GB"))
    print(plan_markdown(ds))

    tesla-func plan --dataset imagenet64 --model convnetd4 --ipc 1 --batch-syn 100 --syn-steps 50 \\
        --device-memory 48GB

Every number comes from the library's own code run on tensors that have shapes but no data
(:func:`tesla_func.memory.predict_cost`): :func:`~tesla_func.matching.match_trajectory` on the
planned model skeleton, with the planned shapes and dtype. Nothing of the planned size is
allocated. Dataset shapes come from :func:`tesla_func.data.shape` (no files are read).

One iteration of the distillation (tesla_func.distill) holds on its device:

==================  ================================================================================
held                the synthetic images and their SGD momentum; the labels (int classes; SLA: the
                    teacher's (N, K) logits; learned: logits and their momentum); the expert
                    checkpoints in use (start, target); the model skeleton's own parameters and
                    buffers; optionally further expert checkpoints (``experts_on_device``); the
                    step index batches and the DSA draws of the iteration (these grow with T)
matching call       the predicted peak of ``match_trajectory`` above its inputs (it includes the
                    gradients the call returns)
SGD update          the returned gradients + 3 copies of the largest updated tensor (the new
                    momentum, lr * momentum and the new value, before the old ones are freed)
SLA teacher         one forward without a graph of the teacher on all N images (SLA strategies),
                    above its output (the labels)
==================  ================================================================================

    iteration peak = held + max(matching call, SGD update, SLA teacher)

**DSA.** Every call of the distillation draws one augmentation family per student step at random.
The plan gives every step the family whose step costs the most memory (found by predicting one
step of each family), so the prediction bounds every iteration's draw from above.

**Long trajectories.** Predicting a call costs about a millisecond per operator, so for T above
``extrapolate_above`` the matching call is predicted at two short T (3 and 4 steps; for ``exact``
with ``state_stride`` k, two T past the first k steps with the residue of T modulo k) and extended
linearly: every step of a call runs the same operators on the same shapes, so peak bytes and FLOPs
are affine in T from T = 3 on. Tests check the extension against direct prediction. A limit found
by linearity (the largest T that fits) is checked by a direct prediction at the limit when it is at
most ``verify_max_steps``.

**Spending the memory a device has.** ``tesla`` and ``exact`` pay for their constant memory with
one extra forward and backward per step (the rebuild); ``keep_graphs = k`` keeps the last k step
graphs of the first pass instead, one step graph of memory per rebuild saved (k = T: ``exact``
does the work of ``unrolled`` and holds its memory). With ``device_memory``, the plan gives for
each of them and each planned T the largest k whose iteration fits, with its peak and FLOPs. The
peak is linear in k from k = 2 on (k = 1 is the call of k = 0), at every T, so k is read off a line
(:meth:`Predictor.keep_line`: the call at k = 0 and three short calls). For T up to
``verify_keep_max_steps`` it is then checked by predicting the whole T-step call at k (it fits)
and at k + 1 (it does not). Above, that check would cost two calls of T steps per method (about
25 s each for a ConvNetD4 on ImageNet at T = 50), so k is the line's, marked as an estimate; tests
check the line against direct prediction.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn
from torch.func import functional_call

from tesla_func.augment import DSA, FAMILIES, ReplayedDSA
from tesla_func.data import DATASETS, DatasetShape, shape
from tesla_func.labels import LABEL_STRATEGIES, LabelStrategy
from tesla_func.matching import METHODS, match_trajectory
from tesla_func.memory import Cost, predict_cost
from tesla_func.models import ARCHITECTURES, build_model
from tesla_func.results import make_results

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ANY = -1  # max_syn_steps of a method whose matching call does not grow with T
NONE = -1  # max_keep_graphs where not even keep_graphs = 0 fits
KEEP_METHODS = ("tesla", "exact")  # the methods that take keep_graphs
LIMITS = ("syn_steps", "batch_syn", "keep_graphs")


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


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str | float) -> int:
    """A memory size in bytes: ``"24GiB"``, ``"48GB"``, ``"80e9"``, ``"512MiB"``, ``"1.5 TB"``.

    Units: B, kB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of 1024), any case; a bare
    number is bytes. Raises ``ValueError`` naming the text and the accepted forms otherwise.
    """
    if isinstance(text, bool):
        raise TypeError(f"a memory size must be a number or text like '48GB', got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"cannot read {text!r} as a memory size: write a number with an optional unit, "
                "e.g. '24GiB', '48GB', '80e9' (bytes) or '512MiB' (units: B, kB, MB, GB, TB, KiB, "
                "MiB, GiB, TiB)"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"a memory size must be finite and > 0, got {text!r}")
    return int(size)


def format_bytes(n: float) -> str:
    """Bytes in KiB below 1 MiB, MiB below 1 GiB, else GiB (binary units)."""
    if abs(n) < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB" if abs(n) < 2**30 else f"{n / 2**30:.2f} GiB"


@dataclass(frozen=True)
class PlanConfig:
    """A planned distillation: dataset, model, sizes and methods (units in the comments)."""

    dataset: str = "cifar10"  # a name of tesla_func.data.DATASETS (shapes only, no files read)
    model: str = "convnet"  # a key of tesla_func.models.ARCHITECTURES
    width: int | None = None  # ConvNet / ResNet width; None: the architecture's own default
    depth: int | None = None  # ConvNet blocks / ViT layers; None: the architecture's default
    ipc: int = 10  # synthetic images per class; N = ipc * classes
    batch_syn: int | None = None  # images per student step; None: the whole set (N)
    syn_steps: tuple[int, ...] = (10, 20, 40)  # T values to plan
    methods: tuple[str, ...] = tuple(METHODS)  # keys of tesla_func.matching.METHODS
    label_strategy: str = "hard"  # a key of tesla_func.labels.LABEL_STRATEGIES
    dsa: bool = True  # replayed DSA on every step (the costliest family on every step)
    dtype: str = "float32"  # images, labels and parameters: a key of DTYPES
    state_stride: int = 1  # exact: keep every k-th student state
    keep_graphs: int | None = None  # tesla / exact: passed to match_trajectory when not None
    device_memory: str | None = None  # e.g. "48GB", "80GiB", "24e9": adds fits and limits
    experts_on_device: int = 0  # further expert checkpoints kept on the device (parameter sets)
    # with device_memory: which limits to search for ("syn_steps": the largest T that fits,
    # "batch_syn": the largest batch at the largest planned T, "keep_graphs": for tesla and
    # exact, the largest keep_graphs at each planned T); each costs extra predictions
    limits: tuple[str, ...] = LIMITS
    extrapolate_above: int = 12  # T above this: predicted at two short T, extended linearly
    verify_max_steps: int = 100  # a T limit up to this is checked by a direct prediction (about
    # half a second per unrolled step on a CPU)
    verify_keep_max_steps: int = 12  # a keep_graphs limit at a T up to this is checked by
    # predicting the whole call at k and k + 1 (two T-step calls per method, each about as slow
    # as unrolled's); above it, k is read off the line in k (an estimate)
    seed: int = 0  # DSA draws

    def __post_init__(self) -> None:
        if isinstance(self.syn_steps, int):
            object.__setattr__(self, "syn_steps", (self.syn_steps,))
        if isinstance(self.methods, str):
            object.__setattr__(self, "methods", (self.methods,))
        object.__setattr__(self, "syn_steps", tuple(self.syn_steps))
        object.__setattr__(self, "methods", tuple(self.methods))
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        try:
            shape(self.dataset)
        except KeyError as err:
            raise ValueError(err.args[0]) from err
        if self.model not in ARCHITECTURES:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(ARCHITECTURES)}")
        for name in ("ipc", "state_stride", "verify_max_steps"):
            _check_int(self, name, 1)
        for name in ("experts_on_device", "extrapolate_above", "verify_keep_max_steps", "seed"):
            _check_int(self, name, 0)
        for name, low in (("width", 1), ("depth", 1), ("batch_syn", 1), ("keep_graphs", 0)):
            if getattr(self, name) is not None:
                _check_int(self, name, low)
        if not self.syn_steps or any(
            not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in self.syn_steps
        ):
            raise ValueError(f"PlanConfig.syn_steps must be T values >= 1, got {self.syn_steps!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(
                f"PlanConfig.methods {list(self.methods)} has unknown or no methods; known: "
                f"{sorted(METHODS)}"
            )
        if self.label_strategy not in LABEL_STRATEGIES:
            raise ValueError(f"unknown label strategy {self.label_strategy!r}; known: "
                             f"{', '.join(LABEL_STRATEGIES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        if self.device_memory is not None:
            parse_bytes(self.device_memory)
        object.__setattr__(self, "limits", tuple(self.limits))
        if any(name not in LIMITS for name in self.limits):
            raise ValueError(f"PlanConfig.limits {list(self.limits)} may hold {list(LIMITS)}")
        if self.batch_syn is not None and self.batch_syn > self.num_images:
            raise ValueError(
                f"batch_syn {self.batch_syn} is larger than the synthetic set: ipc {self.ipc} x "
                f"{self.shape.num_classes} classes = {self.num_images} images. Lower batch_syn "
                "or raise ipc"
            )
        self.skeleton()  # the model must fit the dataset's images

    @property
    def shape(self) -> DatasetShape:
        return shape(self.dataset)

    @property
    def num_images(self) -> int:
        """N, the synthetic images: ipc x classes."""
        return self.ipc * self.shape.num_classes

    @property
    def batch(self) -> int:
        return self.batch_syn or self.num_images

    @property
    def device_bytes(self) -> int | None:
        return None if self.device_memory is None else parse_bytes(self.device_memory)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def skeleton(self) -> nn.Module:
        """The model skeleton on the meta device (no memory), in the planned dtype."""
        s = self.shape
        kw = {k: v for k, v in (("width", self.width), ("depth", self.depth)) if v is not None}
        try:
            with torch.device("meta"):
                model = build_model(self.model, s.channels, s.num_classes, s.image_size, **kw)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"model {self.model!r} {kw or ''} does not fit dataset {self.dataset!r} "
                f"({s.channels}x{s.image_size}x{s.image_size}, {s.num_classes} classes): {err}"
            ) from err
        return model.to(self.torch_dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_int(cfg: object, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{type(cfg).__name__}.{name} must be an int >= {low}, got {value!r}")


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------------------------
# Predicting one matching call


class Predictor:
    """Predicted costs of the matching call of one :class:`PlanConfig`, cached by (method, T, B).

    ``call(method, steps, batch)`` predicts directly for T up to ``cfg.extrapolate_above`` and by
    linearity from two short T above it; ``direct(...)`` always runs the whole call.
    """

    def __init__(self, cfg: PlanConfig) -> None:
        self.cfg = cfg
        self.model = cfg.skeleton()
        self.kind = label_kind(cfg.label_strategy)
        self._cache: dict[tuple, Cost] = {}
        self._family: dict[int, str | None] = {}

    # -- inputs (meta tensors: the prediction turns them into CPU tensors without data) ---------

    def _params(self) -> dict[str, Tensor]:
        return {k: torch.empty_like(p, device="meta") for k, p in self.model.named_parameters()}

    def augment(self, steps: int, batch: int, family: str | None) -> ReplayedDSA | None:
        """The DSA draws of a T-step call, every step of ``family`` (None: no augmentation)."""
        if family is None:
            return None
        dsa, gen = DSA(), torch.Generator().manual_seed(self.cfg.seed)
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
        """The keep_graphs passed to ``method``: ``keep``, else the config's; None: not passed
        (tesla and exact only; 0 is match_trajectory's default)."""
        if method not in KEEP_METHODS:
            return None
        return self.cfg.keep_graphs if keep is None else keep

    def method_kwargs(self, method: str, keep: int | None = None) -> dict[str, Any]:
        """Options of ``match_trajectory`` for ``method`` (exact: state_stride; tesla/exact:
        keep_graphs: ``keep``, else the config's when it sets it)."""
        kw: dict[str, Any] = {"method": method}
        if method == "exact":
            kw["state_stride"] = self.cfg.state_stride
        if self.keep(method, keep) is not None:
            kw["keep_graphs"] = self.keep(method, keep)
        return kw

    def family(self, batch: int) -> str | None:
        """The DSA family whose one-step call (unrolled, T = 1) peaks highest; None without DSA."""
        if not self.cfg.dsa:
            return None
        if batch not in self._family:
            costs = {
                f: predict_cost(match_trajectory, **self.arguments(1, batch, f),
                                method="unrolled")[1]
                for f in FAMILIES
            }
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
            args = self.arguments(steps, batch, self.family(batch))
            self._cache[key] = predict_cost(match_trajectory, **args,
                                            **self.method_kwargs(method, keep))[1]
        return self._cache[key]

    def stride(self, method: str) -> int:
        """s: the period in T (and in keep_graphs) of the call's cost (exact's state_stride)."""
        return self.cfg.state_stride if method == "exact" else 1

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

    def keep_line(self, method: str, steps: int) -> KeepLine:
        """The T-step call's peak and FLOPs as lines in keep_graphs k (2 <= k < T), from the call
        at k = 0 and three short calls.

        Every kept step holds one step graph more and rebuilds one step fewer, so from k = 2 on
        (k = 1 is the call of k = 0) the cost moves by the same amount per kept step, at every T
        (with a stride s, per s kept steps). The line's value at k = 2 is the call at k = 0 plus
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
        )


@dataclass(frozen=True)
class KeepLine:
    """A T-step call's predicted peak bytes and FLOPs against keep_graphs k >= 2 (a line)."""

    peak: int  # at k = 2, bytes
    flops: int  # at k = 2
    peak_per_keep: float  # bytes per further kept step graph
    flops_per_keep: float  # FLOPs per further kept step (negative: one step rebuild fewer)

    def at(self, keep: int) -> Cost:
        return Cost(round(self.peak + (keep - 2) * self.peak_per_keep),
                    round(self.flops + (keep - 2) * self.flops_per_keep))

    def largest(self, room: float, steps: int) -> int:
        """The largest k in {0} and 2 .. T whose peak on the line is at most ``room`` bytes (0
        when not even k = 2 is: k = 0 is checked by the caller)."""
        if self.peak > room:
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
    s, kind = cfg.shape, label_kind(cfg.label_strategy)
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
    s, kind = cfg.shape, label_kind(cfg.label_strategy)
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
    if not label_kind(cfg.label_strategy).teacher:
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


# ----------------------------------------------------------------------------------------------
# Limits


def _largest(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The largest x in [low, high] with fits(x) by bisection (fits is True up to the answer and
    False after it); low - 1 if none fits."""
    if not fits(low):
        return low - 1
    while low < high:  # invariant: fits(low)
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


class Limits:
    """Largest T, largest batch and largest keep_graphs that fit a device, per method.

    ``fixed`` = (bytes held across the call, the largest transient outside it: SGD update or SLA
    teacher); the iteration fits if held + step inputs + max(call, transient) <= device.
    """

    def __init__(self, predictor: Predictor, fixed: tuple[int, int], device: int) -> None:
        self.p, self.fixed, self.device = predictor, fixed, device

    @classmethod
    def of(cls, predictor: Predictor, device: int | str) -> Limits:
        """The limits of ``device`` bytes (or a size like "48GB") for the predictor's config."""
        cfg, model = predictor.cfg, predictor.model
        held = sum(held_bytes(cfg, model).values())
        transient = max(update_peak_bytes(cfg), teacher_peak_bytes(cfg, model))
        return cls(predictor, (held, transient), parse_bytes(device))

    def total(self, method: str, steps: int, batch: int, *, direct: bool) -> int:
        cost = (self.p.direct(method, steps, batch) if direct
                else self.p.call(method, steps, batch)[0])
        held, transient = self.fixed
        return held + self.p.step_inputs_bytes(steps, batch) + max(cost.peak_bytes, transient)

    def max_steps(self, method: str) -> tuple[int, bool]:
        """(largest T that fits, checked by a direct prediction?): ANY if the method's call does
        not grow with T, 0 if not even T = 1 fits. The T from the line through two short T is
        checked by predicting the call at that T (when it is at most ``verify_max_steps``)."""
        cfg, batch = self.p.cfg, self.p.cfg.batch
        a, b = self.p.anchors(method, max(cfg.syn_steps))
        ca, cb = self.p.direct(method, a, batch), self.p.direct(method, b, batch)
        if cb.peak_bytes == ca.peak_bytes:
            return ANY, False

        def fits(t: int) -> bool:
            return self.total(method, t, batch, direct=True) <= self.device

        if not fits(1):
            return 0, True
        held = self.fixed[0]
        per_step = (cb.peak_bytes - ca.peak_bytes) / (b - a) + self.p.step_inputs_bytes(1, batch)
        room = self.device - held - self.p.step_inputs_bytes(a, batch) - ca.peak_bytes
        estimate = max(a + math.floor(room / per_step), 1)
        if estimate > cfg.verify_max_steps:
            return estimate, False
        if fits(estimate):
            return estimate, True
        return _largest(fits, 1, estimate - 1), True  # not linear after all: search below

    def max_batch(self, method: str) -> int:
        """Largest batch_syn (at most N) whose call at the largest planned T fits; 0 if none.

        Estimated on the line through the planned batch and half of it, then checked: the
        estimate must fit and one more image must not (else a bisection over [1, N])."""
        cfg = self.p.cfg
        steps, n, b2 = max(cfg.syn_steps), cfg.num_images, cfg.batch

        def fits(b: int) -> bool:
            return self.total(method, steps, b, direct=False) <= self.device

        b1 = max(1, b2 // 2)
        if b1 < b2:
            t1 = self.total(method, steps, b1, direct=False)
            t2 = self.total(method, steps, b2, direct=False)
            slope = (t2 - t1) / (b2 - b1)
            estimate = n if slope <= 0 else b2 + math.floor((self.device - t2) / slope)
            estimate = min(max(estimate, 1), n)
            if fits(estimate) and (estimate == n or not fits(estimate + 1)):
                return estimate
        return max(_largest(fits, 1, n), 0)

    def max_keep(self, method: str, steps: int, *, verify: bool | None = None) -> KeepLimit:
        """The largest keep_graphs k in 0 .. T whose iteration at T fits (NONE if not even k = 0).

        k = 1 is the call of k = 0 (the last step's graph is kept in any case) and is never the
        answer. k is read off :meth:`Predictor.keep_line`; for T up to ``verify_keep_max_steps``
        (or at most the line's short anchor) it is then checked by predicting the whole call at k
        (it fits) and at the next k (it does not; none after T), and searched by bisection if the
        check fails. Above, the line's k is the answer, marked as not verified. ``verify``
        True or False overrides ``verify_keep_max_steps``.
        """
        p, held, transient = self.p, *self.fixed
        _, b = p.anchors(method, steps, keep=0)
        if verify is None:
            verify = steps <= p.cfg.verify_keep_max_steps
        verify = verify or steps <= b  # short: the line is not used
        room = self.device - held - p.step_inputs_bytes(steps)  # what the call may add

        def cost(keep: int) -> Cost:
            return (p.direct(method, steps, keep=keep) if verify
                    else p.call(method, steps, keep=keep)[0])

        def fits(keep: int) -> bool:
            return max(cost(keep).peak_bytes, transient) <= room

        if not fits(0):
            return KeepLimit(NONE, verify, None)
        line = p.keep_line(method, steps) if steps > b else None
        if line is None:  # short: every k is predicted directly anyway
            keep = steps if steps >= 2 else 0
        else:
            keep = line.largest(room, steps)
            if not verify:
                return KeepLimit(keep, False, cost(0) if keep == 0 else line.at(keep))
        following = 2 if keep == 0 else keep + 1  # k = 1 is the call of k = 0
        if not (fits(keep) and (following > steps or not fits(following))):
            keep = _largest(fits, 2, steps) if steps >= 2 else 0
            keep = 0 if keep < 2 else keep  # none of 2 .. T fits: k = 0
        return KeepLimit(keep, True, cost(keep))


class KeepLimit(NamedTuple):
    """The largest keep_graphs that fits at one T (:meth:`Limits.max_keep`)."""

    keep: int  # k, NONE if not even k = 0 fits
    verified: bool  # found by predicting the whole call at k and the next k
    cost: Cost | None  # the call's predicted peak and FLOPs at k (None: NONE)


# ----------------------------------------------------------------------------------------------
# The plan


def plan(cfg: PlanConfig) -> xr.Dataset:
    """Predicted memory and FLOPs of every planned method and T, with fits and limits.

    Returns an ``xarray.Dataset`` (dims ``method``, ``steps``, ``item``; bytes and FLOPs as
    float64 with units in their attributes):

    - ``call_peak_bytes`` (method, steps): peak of the matching call above its inputs;
    - ``flops`` (method, steps): its floating-point operations (matmuls and convolutions; see
      :class:`tesla_func.memory.Cost`);
    - ``extrapolated`` (method, steps): whether that T was extended linearly from two short T;
    - ``held_bytes`` (item): what the iteration holds across the call (:func:`held_bytes`);
    - ``step_inputs_bytes`` (steps): index batches and DSA draws of the iteration;
    - ``update_peak_bytes``, ``teacher_peak_bytes`` (): the transients after / before the call;
    - ``total_peak_bytes`` (method, steps): held + step inputs + max(call, update, teacher);
    - with ``device_memory``: ``fits`` (method, steps), ``max_syn_steps`` (method; -1 = any T),
      ``max_syn_steps_verified`` (method), ``max_batch_syn`` (method, at the largest T; 0 = none);
      for tesla and exact (NaN for unrolled) ``max_keep_graphs`` (method, steps; -1 = not even
      0), ``max_keep_graphs_verified``, and at that k ``keep_graphs_total_peak_bytes`` (the
      iteration peak) and ``keep_graphs_flops`` (the call's).

    Attributes: the config, the DSA family planned on every step, N, the batch, the model's
    parameter count, the device bytes, and provenance (versions, git revision).
    """
    p = Predictor(cfg)
    methods, steps = list(cfg.methods), sorted(set(cfg.syn_steps))
    held = held_bytes(cfg, p.model)
    update = update_peak_bytes(cfg)
    teacher = teacher_peak_bytes(cfg, p.model)
    inputs = [p.step_inputs_bytes(t) for t in steps]
    peak = np.zeros((len(methods), len(steps)))
    flops = np.zeros_like(peak)
    extrapolated = np.zeros(peak.shape, dtype=bool)
    for i, m in enumerate(methods):
        for j, t in enumerate(steps):
            cost, extrapolated[i, j] = p.call(m, t)
            peak[i, j], flops[i, j] = cost.peak_bytes, cost.flops
    transient = max(update, teacher)
    total = sum(held.values()) + np.asarray(inputs)[None, :] + np.maximum(peak, transient)
    byte_attrs = {"units": "bytes"}
    data: dict[str, Any] = {
        "call_peak_bytes": (("method", "steps"), peak, {
            **byte_attrs, "long_name": "peak of the matching call above its inputs (predicted)"}),
        "flops": (("method", "steps"), flops, {
            "units": "FLOP", "long_name": "floating-point operations of the matching call "
                                          "(matmul, convolution and attention kernels)"}),
        "extrapolated": (("method", "steps"), extrapolated, {
            "long_name": "extended linearly from two short T (exact: tests check it)"}),
        "held_bytes": (("item",), np.array(list(held.values()), dtype=np.float64), {
            **byte_attrs, "long_name": "held by the iteration across the call"}),
        "step_inputs_bytes": (("steps",), np.array(inputs, dtype=np.float64), {
            **byte_attrs, "long_name": "index batches and DSA draws of the iteration"}),
        "update_peak_bytes": ((), float(update), {
            **byte_attrs, "long_name": "SGD update after the call, above the held memory"}),
        "teacher_peak_bytes": ((), float(teacher), {
            **byte_attrs, "long_name": "SLA teacher forward before the call, above held"}),
        "total_peak_bytes": (("method", "steps"), total, {
            **byte_attrs, "long_name": "iteration peak: held + step inputs + max(call, update, "
                                       "teacher)"}),
    }
    device = cfg.device_bytes
    if device is not None:
        limits = Limits(p, (sum(held.values()), transient), device)
        data["fits"] = (("method", "steps"), total <= device, {"long_name": "fits the device"})
        if "syn_steps" in cfg.limits:
            max_steps = [limits.max_steps(m) for m in methods]
            data["max_syn_steps"] = (("method",), np.array([s for s, _ in max_steps]), {
                "long_name": "largest T that fits the device (-1: any T, 0: none)"})
            data["max_syn_steps_verified"] = (("method",), np.array([v for _, v in max_steps]), {
                "long_name": "the T limit was checked by a direct prediction"})
        if "batch_syn" in cfg.limits:
            data["max_batch_syn"] = (("method",), np.array([limits.max_batch(m) for m in methods]),
                                     {"long_name": f"largest batch_syn that fits at T = "
                                                   f"{max(steps)} (0: none)"})
        if "keep_graphs" in cfg.limits:
            outside = np.broadcast_to(sum(held.values()) + np.asarray(inputs)[None, :], peak.shape)
            data.update(_keep_graphs_limits(limits, methods, steps, outside, transient))
    s = cfg.shape
    return make_results(
        data,
        coords={"method": methods, "steps": steps, "item": list(held)},
        config=cfg,
        seed=cfg.seed,
        device="cpu",
        kind="predicted (fake tensors)",
        dsa_family=p.family(cfg.batch) or "none",
        num_images=cfg.num_images,
        batch_syn=cfg.batch,
        num_params=sum(t.numel() for t in p.model.parameters()),
        image_shape=[s.channels, s.image_size, s.image_size],
        num_classes=s.num_classes,
        device_bytes=-1 if device is None else device,
    )


def _keep_graphs_limits(limits: Limits, methods: list[str], steps: list[int],
                        outside: np.ndarray, transient: int) -> dict[str, Any]:
    """The largest keep_graphs per (method, T) and the iteration at it, as Dataset variables.
    ``outside`` (method, steps): the iteration peak less the call's (held + step inputs)."""
    found = {(m, t): limits.max_keep(m, t) for m in methods if m in KEEP_METHODS for t in steps}
    shape = (len(methods), len(steps))
    keep, peak, flops = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    verified = np.zeros(shape, dtype=bool)
    for (m, t), lim in found.items():
        i, j = methods.index(m), steps.index(t)
        keep[i, j], verified[i, j] = lim.keep, lim.verified
        if lim.cost is not None:
            peak[i, j] = outside[i, j] + max(lim.cost.peak_bytes, transient)
            flops[i, j] = lim.cost.flops
    return {
        "max_keep_graphs": (("method", "steps"), keep, {
            "long_name": "largest keep_graphs whose iteration fits the device (tesla, exact; "
                         f"{NONE}: not even 0; 1 is the call of 0 and never reported)"}),
        "max_keep_graphs_verified": (("method", "steps"), verified, {
            "long_name": "checked by predicting the call at keep_graphs k and the next k"}),
        "keep_graphs_total_peak_bytes": (("method", "steps"), peak, {
            "units": "bytes", "long_name": "iteration peak at the largest keep_graphs"}),
        "keep_graphs_flops": (("method", "steps"), flops, {
            "units": "FLOP", "long_name": "FLOPs of the matching call at the largest keep_graphs"}),
    }


def plan_records(ds: xr.Dataset) -> dict[str, Any]:
    """The plan as plain JSON-able data: ``{"config", "held_bytes", "rows", "limits"}``."""
    rows = []
    for m in ds["method"].values.tolist():
        for t in ds["steps"].values.tolist():
            at = ds.sel({"method": m, "steps": t})
            row = {
                "method": m,
                "steps": int(t),
                "call_peak_bytes": int(at["call_peak_bytes"]),
                "total_peak_bytes": int(at["total_peak_bytes"]),
                "flops": int(at["flops"]),
                "extrapolated": bool(at["extrapolated"]),
            }
            if "fits" in ds:
                row["fits"] = bool(at["fits"])
            if "max_keep_graphs" in ds and not np.isnan(at["max_keep_graphs"]):
                keep = int(at["max_keep_graphs"])
                row["max_keep_graphs"] = None if keep == NONE else keep
                row["max_keep_graphs_verified"] = bool(at["max_keep_graphs_verified"])
                if keep != NONE:
                    row["keep_graphs_total_peak_bytes"] = int(at["keep_graphs_total_peak_bytes"])
                    row["keep_graphs_flops"] = int(at["keep_graphs_flops"])
            rows.append(row)
    limits = []
    if "max_syn_steps" in ds or "max_batch_syn" in ds:
        for m in ds["method"].values.tolist():
            at = ds.sel({"method": m})
            lim: dict[str, Any] = {"method": m}
            if "max_syn_steps" in ds:
                steps = int(at["max_syn_steps"])
                lim["max_syn_steps"] = "any" if steps == ANY else steps
                lim["max_syn_steps_verified"] = bool(at["max_syn_steps_verified"])
            if "max_batch_syn" in ds:
                lim["max_batch_syn"] = int(at["max_batch_syn"])
            limits.append(lim)
    return {
        "config": ds.attrs.get("config"),
        "num_images": int(ds.attrs["num_images"]),
        "batch_syn": int(ds.attrs["batch_syn"]),
        "num_params": int(ds.attrs["num_params"]),
        "dsa_family": ds.attrs["dsa_family"],
        "device_bytes": None if ds.attrs["device_bytes"] < 0 else int(ds.attrs["device_bytes"]),
        "held_bytes": {str(k): int(v) for k, v in zip(ds["item"].values, ds["held_bytes"].values)},
        "step_inputs_bytes": {int(t): int(v) for t, v in zip(ds["steps"].values,
                                                              ds["step_inputs_bytes"].values)},
        "update_peak_bytes": int(ds["update_peak_bytes"]),
        "teacher_peak_bytes": int(ds["teacher_peak_bytes"]),
        "rows": rows,
        "limits": limits,
    }


def _keep_cell(row: dict[str, Any]) -> str:
    """A row's largest keep_graphs: k, the iteration peak and GFLOPs at k (- where the method
    takes no keep_graphs)."""
    if "max_keep_graphs" not in row:
        return "-"
    keep = row["max_keep_graphs"]
    if keep is None:
        return "none"
    estimate = "" if row["max_keep_graphs_verified"] else ", est."
    return (f"{keep} ({format_bytes(row['keep_graphs_total_peak_bytes'])}, "
            f"{row['keep_graphs_flops'] / 1e9:.1f} GFLOPs{estimate})")


def plan_markdown(ds: xr.Dataset) -> str:
    """The plan as Markdown: one row per (method, T), then what is held, then the limits."""
    from tesla_func.results import markdown_table

    rec = plan_records(ds)
    device = rec["device_bytes"]
    header = ["method", "T", "matching call", "iteration peak", "GFLOPs (call)"]
    if device is not None:
        header.append(f"fits {format_bytes(device)}")
    keeps = "max_keep_graphs" in ds
    if keeps:
        header.append("largest keep_graphs")
    rows = []
    for r in rec["rows"]:
        row = [r["method"], f"{r['steps']}" + (" *" if r["extrapolated"] else ""),
               format_bytes(r["call_peak_bytes"]), format_bytes(r["total_peak_bytes"]),
               f"{r['flops'] / 1e9:.1f}"]
        if device is not None:
            row.append("yes" if r["fits"] else "no")
        if keeps:
            row.append(_keep_cell(r))
        rows.append(row)
    cfg = rec["config"]
    lines = [
        (
            f"Plan: {cfg['dataset']}, {cfg['model']} ({rec['num_params']:,} parameters), "
            f"{rec['num_images']} synthetic images ({cfg['ipc']} per class), batch "
            f"{rec['batch_syn']}, label strategy {cfg['label_strategy']}, {cfg['dtype']}, DSA "
            f"family on every step: {rec['dsa_family']}."
        ),
        "",
        markdown_table(header, rows),
        "",
        "Held across the call: " + "; ".join(
            f"{k} {format_bytes(v)}" for k, v in rec["held_bytes"].items() if v
        ) + "; index batches and DSA draws " + ", ".join(
            f"{format_bytes(v)} at T={t}" for t, v in rec["step_inputs_bytes"].items()
        ) + f". SGD update after the call: {format_bytes(rec['update_peak_bytes'])}"
        + (f"; SLA teacher forward: {format_bytes(rec['teacher_peak_bytes'])}"
           if rec["teacher_peak_bytes"] else "") + ".",
    ]
    if any(r["extrapolated"] for r in rec["rows"]):
        lines.append("* extended linearly from two short trajectories (peak and FLOPs are affine "
                     "in T).")
    if keeps:
        lines.append(
            "largest keep_graphs: the most final steps whose graphs the first pass keeps (each "
            "saves a step rebuild, a forward and a backward, for one step graph of memory; "
            "k = 1 is the call of k = 0) that still fit, with the iteration's peak and the call's "
            "GFLOPs at that k; est.: read off the line in k, not checked by predicting the call "
            "at k and k + 1 (T above verify_keep_max_steps).")
    if rec["limits"]:
        lines.append("")
        for lim in rec["limits"]:
            parts = []
            if "max_syn_steps" in lim:
                t = lim["max_syn_steps"]
                parts.append(
                    "fits for any T (its peak does not grow with T)" if t == "any"
                    else "does not fit even at T = 1" if t == 0
                    else f"fits for T <= {t}" + ("" if lim["max_syn_steps_verified"]
                                                 else " (linear estimate)"))
            if "max_batch_syn" in lim:
                b = lim["max_batch_syn"]
                whole = " (the whole set)" if b == rec["num_images"] else ""
                parts.append(f"largest batch_syn at T = {max(cfg['syn_steps'])}: "
                             + (f"{b}{whole}" if b else "none"))
            lines.append(f"- `{lim['method']}` on {format_bytes(device)}: " + "; ".join(parts))
    return "\n".join(lines)

"""``keep_graphs="auto"``: the largest k whose matching call fits the memory free on the device.

``tesla`` and ``exact`` pay for their constant memory with one step rebuild (a forward and a
backward) per step; ``keep_graphs = k`` keeps the last k first-pass graphs instead (one step graph
of memory per rebuild saved; at k = T ``exact`` does ``unrolled``'s work). ``"auto"`` spends what
the device has: the largest k in 0 .. T whose call peak, on the planner's line in k
(:meth:`~tesla_func.planner.Predictor.keep_line`, read by
:meth:`~tesla_func.planner.Limits.max_keep`), fits the room::

    room = memory_budget                       (given: "8GB"; taken as it is)
         = MEMORY_FRACTION[device] * free      (else; free = what the device has now)

    free (CUDA) = torch.cuda.mem_get_info free + (reserved - allocated by torch's allocator)
    free (CPU)  = MemAvailable of /proc/meminfo (0 where it is not known: k = 0)

The room must hold the call's peak and the step inputs (index batches, DSA draws), and, in a
distillation, the SGD update or the SLA teacher after/before the call (whichever is larger);
everything the run holds across the call (images, momenta, expert checkpoints) is allocated
already, so it is not in ``free``. ``MEMORY_FRACTION`` is the safety margin: 0.8 on CPU, where
other processes take and give back memory while a run goes on, 0.9 on CUDA, where the prediction
is within 2.5 % of the allocator's peak and the rest is fragmentation.

**Once per run shape.** The line is found once per shape (model, images, labels, batch, method,
T, stride, microbatches, dtype, device) and cached in the process: the points of the line are
*measured* on the device on real tensors of the run's shapes (:class:`Predictor` with
``measure_on``), a one-step call per DSA family (the worst is planned for every step, as the
planner does) and four short calls (T = 3 and 4 at k = 0, T = 4 at k = 2 and 3), which on CPU
equal the fake-tensor prediction to the byte (:mod:`tesla_func.memory`) at a fraction of its cost:
a prediction runs about a millisecond of Python per operator, several seconds for the line of a
small ConvNet, where the measured line costs about fifteen short steps of the run (about 1 s at
the main job's size). Where a measured step turns out slower than predicting one (the paper's
CIFAR-10 size on a CPU: 1-2 s a step), the rest of the line is predicted (``PREDICT_ABOVE_S``;
about 20 s there, a third of one of its iterations). The free memory is read again at every
choice (cheap).

The gradient does not depend on k (up to rounding; tests/test_matching.py checks it in float64),
so the choice changes time and memory only.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tesla_func.data import DatasetShape
from tesla_func.distill_config import DistillConfig
from tesla_func.matching import METHODS
from tesla_func.memory import format_bytes, parse_bytes
from tesla_func.planner.limits import Limits
from tesla_func.planner.predictor import (
    Predictor,
    label_kind,
    teacher_peak_bytes,
    update_peak_bytes,
)

AUTO = "auto"
# Fraction of the free memory the call may take (the safety margin is the rest), by device type.
MEMORY_FRACTION = {"cpu": 0.8, "cuda": 0.9}
EXTRAPOLATE_ABOVE = 4  # T above this: the call at k = 0 from T = 3 and 4 (the planner's line)


@dataclass(frozen=True)
class RunShape:
    """A run as the :class:`Predictor` sees it, read from the run itself (its model, data and
    options) rather than from names: what a :class:`~tesla_func.planner.PlanConfig` gives a plan.

    ``distill`` supplies the options of the call (label strategy, DSA, state_stride,
    microbatch_size, batch_syn, seed); ``model`` is the run's skeleton on its device (the
    measured calls run it); ``num_images`` is N (one process's whole set).
    """

    distill: DistillConfig
    shape: DatasetShape
    model: nn.Module
    num_images: int
    torch_dtype: torch.dtype
    extrapolate_above: int = EXTRAPOLATE_ABOVE
    experts_on_device: int = 0
    verify_keep_max_steps: int = 0  # the line's k is the answer: no whole-T check

    @property
    def batch(self) -> int:
        return self.distill.batch_syn or self.num_images

    def skeleton(self) -> nn.Module:
        """The model on the meta device (shapes only), in the run's dtype."""
        return copy.deepcopy(self.model).to(device="meta", dtype=self.torch_dtype)


@dataclass(frozen=True)
class KeepChoice:
    """What ``keep_graphs="auto"`` picked for one run shape, and why (logged with the run)."""

    keep: int  # k, 0 .. T
    steps: int  # T
    method: str
    peak_bytes: int  # the call's peak at k (with the step inputs and the transient after it)
    room_bytes: int  # what it had to fit in
    free_bytes: int | None  # the device's free memory (None: a budget was given)
    source: str  # where room came from: "memory_budget", "cuda mem_get_info", "MemAvailable"
    fits: bool = True  # False: not even k = 0 fits the room (k = 0 is taken anyway)
    seconds: float = 0.0  # what the choice took (measuring the line, the first time per shape)

    def describe(self) -> str:
        """One line for the run's log."""
        if self.source == "method":
            return f"keep_graphs auto: {self.method} takes no keep_graphs"
        where = (f"memory_budget {format_bytes(self.room_bytes)}" if self.free_bytes is None
                 else f"{format_bytes(self.room_bytes)} = {self.fraction:.0%} of "
                      f"{format_bytes(self.free_bytes)} free ({self.source})")
        verdict = "" if self.fits else " (not even k = 0 fits: constant memory anyway)"
        return (f"keep_graphs auto: k = {self.keep} of T = {self.steps} for {self.method}, "
                f"predicted peak {format_bytes(self.peak_bytes)} in {where}{verdict} "
                f"(chosen in {self.seconds:.1f} s)")

    @property
    def fraction(self) -> float:
        return self.room_bytes / self.free_bytes if self.free_bytes else math.nan

    def attrs(self) -> dict[str, Any]:
        """The choice as attributes of the run's log (log.nc)."""
        return {"keep_graphs": self.keep, "keep_graphs_requested": AUTO,
                "keep_graphs_peak_bytes": self.peak_bytes,
                "keep_graphs_room_bytes": self.room_bytes,
                "keep_graphs_memory": self.source, "keep_graphs_choice_s": self.seconds}


def free_memory(device: str | torch.device) -> tuple[int, str]:
    """(bytes free on ``device`` now, where that was read). CPU: MemAvailable (0 where unknown:
    the caller then keeps no graph)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, "cuda mem_get_info"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable"  # the kernel reports kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "SC_AVPHYS_PAGES"
    except (ValueError, OSError, AttributeError):
        return 0, "unknown"


@dataclass
class _Lines:
    """The measured predictors of this process, one per run shape (see the module docstring)."""

    predictors: dict[tuple, Predictor] = field(default_factory=dict)

    def get(self, run: RunShape, device: torch.device) -> Predictor:
        d = run.distill
        params = tuple((k, tuple(p.shape)) for k, p in run.model.named_parameters())
        soft = label_kind(d.label_strategy).soft  # all the labels change in the call
        key = (type(run.model).__name__, repr(run.model), params, run.shape, run.num_images,
               run.torch_dtype, run.batch, soft, d.dsa, d.state_stride, d.microbatch_size,
               str(device))
        if key not in self.predictors:
            self.predictors[key] = Predictor(run, measure_on=device)  # type: ignore[arg-type]
        return self.predictors[key]


_LINES = _Lines()


def choose_keep_graphs(
    run: RunShape,
    method: str,
    steps: int,
    device: str | torch.device,
    *,
    memory_budget: str | int | None = None,
    transient: bool = True,
) -> KeepChoice:
    """The largest keep_graphs whose T-step ``method`` call fits the room (module docstring).

    ``transient``: also fit the distillation's SGD update and SLA teacher (a plain matching call
    has neither). A method that takes no keep_graphs gets k = 0 without any prediction.
    """
    if not METHODS[method].takes_keep_graphs:
        return KeepChoice(0, steps, method, 0, 0, None, "method")
    tic = time.perf_counter()
    device = torch.device(device)
    predictor = _LINES.get(run, device)
    # the SGD update after the call, or the SLA teacher before it (RunShape reads as a PlanConfig)
    after = max(update_peak_bytes(run), teacher_peak_bytes(run)) if transient else 0
    if memory_budget is not None:
        room, free, source = parse_bytes(memory_budget), None, "memory_budget"
    else:
        predictor.family(run.batch)  # measure first: the allocator then holds what it used
        free, source = free_memory(device)
        room = int(MEMORY_FRACTION.get(device.type, 0.8) * free)
    limit = Limits(predictor, (0, after), room).max_keep(method, steps, verify=False)
    inputs = predictor.step_inputs_bytes(steps)
    if limit.keep is None:  # not even the constant-memory call fits: it is still the best bet
        cost = predictor.call(method, steps, keep=0)[0]
        return KeepChoice(0, steps, method, inputs + max(cost.peak_bytes, after), room, free,
                          source, fits=False, seconds=time.perf_counter() - tic)
    peak = inputs + max(limit.cost.peak_bytes, after)
    return KeepChoice(limit.keep, steps, method, peak, room, free, source,
                      seconds=time.perf_counter() - tic)

"""The config of one distillation run (:class:`DistillConfig`): every option of ``tesla-func
distill`` and of :class:`tesla_func.distill.Distiller`, saved with every output of the run.

The memory planner plans a ``DistillConfig`` (:class:`tesla_func.planner.PlanConfig` holds one),
and ``tesla-func plan`` takes the options that change memory by the same flags as ``distill``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tesla_func.configargs import check_choice, check_int, check_non_negative
from tesla_func.labels import LABEL_STRATEGIES, LabelStrategy
from tesla_func.matching import METHODS
from tesla_func.memory import parse_bytes

IMAGE_INITS = ("real", "noise")


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run; saved with every output. Defaults: a small Fashion-MNIST run."""

    experts_dir: str | None = None  # folder of expert_*.safetensors to match (required)
    # the dataset distilled; None: the experts' dataset (a plan reads no experts: it needs one)
    dataset: str | None = None
    data_root: str | None = None  # folder holding the dataset's files (None: default places)
    ipc: int = 1  # synthetic images per class
    method: str = "tesla"  # gradient method, a key of tesla_func.matching.METHODS
    label_strategy: str = "hard"  # a key of tesla_func.labels.LABEL_STRATEGIES
    iterations: int = 200  # image updates
    syn_steps: int = 20  # T, student steps per iteration
    match_epochs: int = 2  # M, expert epochs matched: target = start epoch + M
    max_start_epoch: int = 4  # start epoch t ~ U{0 .. max_start_epoch - 1}
    batch_syn: int | None = None  # synthetic images per student step; None: the whole set
    # exact method: keep every k-th student state in the forward pass and recompute the others
    # (memory (T/k + k) parameter vectors instead of T; k - 1 extra forward steps per k)
    state_stride: int = 1
    # rows that go through the network at once in a student step (None: the whole minibatch;
    # the same result up to rounding, with about one microbatch's graph in memory)
    microbatch_size: int | None = None
    # the last k student steps keep their first-pass graphs: one step graph of memory each, for
    # one step rebuild (a forward and a backward) fewer; 0: constant memory; auto: the largest k
    # whose iteration fits the free device memory (or memory_budget), chosen once at the start
    # and logged (tesla and exact; unrolled ignores it; the gradient does not depend on k)
    keep_graphs: int | str = "auto"
    # keep_graphs auto: the memory an iteration may add on the device, e.g. "8GB" (None: 80 %
    # of the free memory on CPU, 90 % on CUDA)
    memory_budget: str | None = None
    lr_img: float = 1000.0  # SGD lr of the images
    # SGD lr of log(beta) (beta = exp(log_beta) stays positive). A raw-beta lr r (the papers'
    # lr_lr, 1e-7..1e-5) is about r / beta^2 here: 0.1..10 for beta = 0.01..0.001.
    lr_lr: float = 1.0
    # |dL/dlog(beta)| is clipped to this before the update (None: no clip), so one iteration
    # changes log(beta) by at most lr_lr * lr_grad_clip (before momentum)
    lr_grad_clip: float | None = None
    lr_labels: float = 10.0  # SGD lr of the label logits (strategies that learn them)
    momentum: float = 0.5  # SGD momentum of images, logits and log(beta)
    lr_init: float | None = None  # initial beta; None: the experts' training lr
    label_init_confidence: float = 0.9  # learned logits: initial softmax mass on the true class
    image_init: str = "real"  # "real": random real images of each class; "noise": N(0, 1)
    dsa: bool = True  # replayed DSA on the synthetic minibatches
    eval_every: int = 0  # evaluate every N iterations (0: only at the end)
    eval_epochs: int = 300  # evaluation protocol: training epochs (the paper: 1000)
    eval_models: int = 3  # evaluation protocol: networks trained per evaluation
    save_every: int = 25  # iterations between atomic checkpoints of the run
    # iterations between snapshots of the set, kept as run/snapshots/images_<iteration>.safetensors
    # (synthetic-set files, taken at iteration 0, every snapshot_every iterations and at the last;
    # plots.plot_image_strip lines them up); 0: no snapshots
    snapshot_every: int = 0
    seed: int = 0  # the run's generator: experts, start epochs, minibatches, DSA, initial images
    device: str = "cpu"  # where the matching runs

    def __post_init__(self) -> None:
        check_int(self, "ipc", "iterations", "syn_steps", "match_epochs", "max_start_epoch",
                  "state_stride", "eval_epochs", "eval_models", "save_every")
        check_int(self, "batch_syn", "microbatch_size", optional=True)
        check_int(self, "eval_every", "snapshot_every", low=0)
        keep = self.keep_graphs
        if keep != "auto" and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 0):
            raise ValueError(f"DistillConfig.keep_graphs must be 'auto' or an int >= 0, got "
                             f"{keep!r}")
        if self.memory_budget is not None:
            try:
                parse_bytes(self.memory_budget)
            except (TypeError, ValueError) as err:
                raise ValueError(f"DistillConfig.memory_budget: {err}") from err
        check_choice(self, "method", METHODS)
        check_choice(self, "label_strategy", LABEL_STRATEGIES)
        check_choice(self, "image_init", IMAGE_INITS)
        check_non_negative(self, ("lr_img", "lr_lr", "lr_labels"))
        for name in ("lr_grad_clip", "lr_init"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"DistillConfig.{name} must be None or finite and > 0, "
                                 f"got {value}")
        if not 0 < self.label_init_confidence < 1:
            raise ValueError("DistillConfig.label_init_confidence must lie in (0, 1)")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"DistillConfig.momentum must lie in [0, 1), got {self.momentum}")

    @property
    def strategy(self) -> LabelStrategy:
        return LABEL_STRATEGIES[self.label_strategy]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

"""The config of one distillation run (:class:`DistillConfig`): every option of ``tesla-func
distill`` and of :class:`tesla_func.distill.Distiller`, saved with every output of the run.

Fields that depend on the dataset default to None and are resolved when the run knows its experts
and their dataset (:meth:`DistillConfig.resolved`, :mod:`tesla_func.data.defaults`).

The memory planner plans a ``DistillConfig`` (:class:`tesla_func.planner.PlanConfig` holds one),
and ``tesla-func plan`` takes the options that change memory by the same flags as ``distill``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tesla_func.configargs import check_choices, check_int, check_non_negative, choice
from tesla_func.data import (
    DATASETS,
    DatasetInfo,
    batch_syn_for,
    expert_steps,
    lr_img_for,
    resolve,
    run_defaults,
)
from tesla_func.labels import LABEL_STRATEGIES, LabelStrategy
from tesla_func.matching import METHODS
from tesla_func.memory import parse_bytes

IMAGE_INITS = ("real", "noise")


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run; saved with every output. A field left None takes the dataset's
    default once the experts and their dataset are known (:meth:`resolved`; the numbers:
    :mod:`tesla_func.data.defaults`); the run saves the resolved config and why."""

    experts_dir: str | None = None  # folder of expert_*.safetensors to match (required)
    # the dataset distilled; None: the experts' dataset (a plan reads no experts: it needs one)
    dataset: str | None = choice(None, DATASETS)
    data_root: str | None = None  # folder holding the dataset's files (None: default places)
    ipc: int = 1  # synthetic images per class
    # gradient method: exact is MTT's gradient in constant memory; tesla drops its Hessian terms
    # (README: why exact is the default)
    method: str = choice("exact", METHODS)
    label_strategy: str = choice("hard", LABEL_STRATEGIES)  # the labels the images train with
    iterations: int | None = None  # image updates (None: the dataset's default)
    # T, student steps per iteration (None: the dataset's default, at most the SGD steps the
    # experts took in match_epochs epochs: a longer student overshoots its target)
    syn_steps: int | None = None
    match_epochs: int = 2  # M, expert epochs matched: target = start epoch + M
    # start epoch t ~ U{0 .. max_start_epoch - 1} (None: the dataset's default, at most what
    # the experts' epochs allow)
    max_start_epoch: int | None = None
    # synthetic images per student step (None: the dataset's default, at most the set: 20 for
    # Fashion-MNIST, the whole set for the others)
    batch_syn: int | None = None
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
    # SGD lr of the images (None: the dataset's default: one per pixel of an image, 64 for 8x8
    # digits, 780 for 28x28 Fashion-MNIST; 1000 for ZCA-whitened CIFAR)
    lr_img: float | None = None
    # SGD lr of log(beta) (beta = exp(log_beta) stays positive). A raw-beta lr r (the papers'
    # lr_lr, 1e-7..1e-5) is about r / beta^2 here: 0.1..10 for beta = 0.01..0.001.
    lr_lr: float = 1.0
    # |dL/dlog(beta)| is clipped to this before the update (inf: no clip), so one iteration
    # changes log(beta) by at most lr_lr * lr_grad_clip (before momentum): without it one large
    # first gradient (3.3 on digits) took beta from 0.01 to 4e-4 in one step
    lr_grad_clip: float = 0.5
    # beta stays within [beta0 / b, beta0 * b] (log beta clipped); a run whose beta reaches
    # either bound stops, writing its last set (inf: no bound)
    beta_bound: float = 1000.0
    # a run stops, writing its last good set, once this many updates were skipped for a
    # non-finite loss, gradient or update (0: never stops for them)
    max_skipped: int = 10
    lr_labels: float = 10.0  # SGD lr of the label logits (strategies that learn them)
    momentum: float = 0.5  # SGD momentum of images, logits and log(beta)
    lr_init: float | None = None  # initial beta; None: the experts' training lr
    label_init_confidence: float = 0.9  # learned logits: initial softmax mass on the true class
    # "real": random real images of each class; "noise": N(0, 1)
    image_init: str = choice("real", IMAGE_INITS)
    dsa: bool = True  # replayed DSA on the synthetic minibatches (and in its evaluation)
    eval_every: int = 0  # evaluate every N iterations (0: only at the end)
    # the run's own evaluation: training epochs of each network (300 keeps it short; the
    # paper's protocol, 1000, is `tesla-func evaluate`'s default)
    eval_epochs: int = 300
    eval_models: int = 3  # the run's own evaluation: networks trained per evaluation
    save_every: int = 25  # iterations between atomic checkpoints of the run
    # iterations between snapshots of the set, kept as run/snapshots/images_<iteration>.safetensors
    # (synthetic-set files, taken at iteration 0, every snapshot_every iterations and at the last;
    # plots.plot_image_strip lines them up); 0: no snapshots
    snapshot_every: int = 0
    seed: int = 0  # the run's generator: experts, start epochs, minibatches, DSA, initial images
    device: str = "cpu"  # where the matching runs

    def __post_init__(self) -> None:
        check_int(self, "ipc", "match_epochs", "state_stride", "eval_epochs", "eval_models",
                  "save_every")
        check_int(self, "iterations", "syn_steps", "max_start_epoch", "batch_syn",
                  "microbatch_size", optional=True)
        check_int(self, "eval_every", "snapshot_every", "max_skipped", low=0)
        keep = self.keep_graphs
        if keep != "auto" and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 0):
            raise ValueError(f"DistillConfig.keep_graphs must be 'auto' or an int >= 0, got "
                             f"{keep!r}")
        if self.memory_budget is not None:
            try:
                parse_bytes(self.memory_budget)
            except (TypeError, ValueError) as err:
                raise ValueError(f"DistillConfig.memory_budget: {err}") from err
        check_choices(self)
        check_non_negative(self, ("lr_lr", "lr_labels"))
        if self.lr_img is not None:
            check_non_negative(self, ("lr_img",))
        for name in ("lr_grad_clip", "beta_bound"):
            # "off" is inf, which a config.toml can hold (TOML has no None); None is read as inf
            if getattr(self, name) is None:
                object.__setattr__(self, name, math.inf)
        if self.lr_init is not None and not (math.isfinite(self.lr_init) and self.lr_init > 0):
            raise ValueError(f"DistillConfig.lr_init must be None or finite and > 0, got "
                             f"{self.lr_init}")
        if not self.lr_grad_clip > 0:  # (False for NaN)
            raise ValueError(f"DistillConfig.lr_grad_clip must be > 0, or inf for no clip, got "
                             f"{self.lr_grad_clip}")
        if not self.beta_bound > 1:
            raise ValueError(f"DistillConfig.beta_bound must be > 1, or inf for no bound, got "
                             f"{self.beta_bound}")
        if not 0 < self.label_init_confidence < 1:
            raise ValueError("DistillConfig.label_init_confidence must lie in (0, 1)")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"DistillConfig.momentum must lie in [0, 1), got {self.momentum}")

    @property
    def strategy(self) -> LabelStrategy:
        return LABEL_STRATEGIES[self.label_strategy]

    def resolved(self, info: DatasetInfo, *, train_size: int, expert_lr: float,
                 expert_epochs: int, expert_batch_size: int) -> tuple[DistillConfig, dict]:
        """This config with its None fields set for experts of ``expert_epochs`` epochs (the
        shortest), trained at ``expert_lr`` in batches of ``expert_batch_size`` on
        ``train_size`` images of dataset ``info``; and the record of what was chosen and why.

        T is the dataset's, but no more than the SGD steps the experts took in
        ``match_epochs`` epochs; the start epochs reach no further than the experts do."""
        defaults, why = run_defaults(info.name, info.channels, info.image_size)
        steps = expert_steps(self.match_epochs, train_size, expert_batch_size)
        syn_steps = (defaults.syn_steps, why)
        if steps < defaults.syn_steps:
            syn_steps = (steps, f"the SGD steps an expert took in match_epochs "
                                f"{self.match_epochs} (ceil({train_size} / {expert_batch_size}) "
                                "an epoch): a longer student overshoots its target")
        starts = max(1, expert_epochs - self.match_epochs + 1)
        max_start = (defaults.max_start_epoch, why)
        if starts < defaults.max_start_epoch:
            max_start = (starts, f"the experts' {expert_epochs} epochs less match_epochs "
                                 f"{self.match_epochs}, plus 1")
        batch = batch_syn_for(defaults, self.ipc * info.num_classes)
        return resolve(self, {
            **({"batch_syn": (batch, why)} if batch is not None else {}),
            "iterations": (defaults.iterations, why),
            "syn_steps": syn_steps,
            "max_start_epoch": max_start,
            "lr_img": (lr_img_for(info.channels, info.image_size) if defaults.lr_img is None
                       else (defaults.lr_img, why)),
            "lr_init": (expert_lr, "the experts' lr"),
        })

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

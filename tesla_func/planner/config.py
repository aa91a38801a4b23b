"""What a plan plans: a distillation run (:class:`~tesla_func.distill_config.DistillConfig`) and
what only planning needs (the network when there are no experts to read it from, the dtype, the
device memory, the limits to search for, the T values and methods compared, and how far to trust
linear extensions).

The run's fields are sorted once, here, into those a plan reads (:data:`PLANNED_FIELDS`: each is
a ``tesla-func plan`` flag spelled as for ``tesla-func distill``) and those that change no memory
of an iteration (:data:`UNPLANNED_FIELDS`); a test checks that every field of ``DistillConfig`` is
in exactly one of them, so a new field must be sorted too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tesla_func.configargs import check_int, choice
from tesla_func.data import DATASETS, DatasetShape, batch_syn_for, run_defaults, shape
from tesla_func.distill_config import DistillConfig
from tesla_func.matching import METHODS
from tesla_func.memory import parse_bytes
from tesla_func.models import ARCHITECTURES, build_model

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
LIMITS = ("syn_steps", "batch_syn", "keep_graphs")

# The DistillConfig fields a plan reads: what sets the shapes and sizes of an iteration, the
# method and its options, the labels, DSA and the seed of its draws.
PLANNED_FIELDS = ("dataset", "ipc", "batch_syn", "syn_steps", "method", "label_strategy", "dsa",
                  "state_stride", "microbatch_size", "keep_graphs", "seed")
# Two of them a plan sweeps, to compare several values side by side: run field -> the PlanConfig
# field holding its values (flags --syn-steps and --method, each taking several values). The
# run's own syn_steps and method are not read.
SWEPT_FIELDS = {"syn_steps": "syn_steps", "method": "methods"}
# The DistillConfig fields that change no memory of an iteration: the files a run reads (a plan
# reads none: the dataset and network are given instead), the schedule, learning rates and
# initial values, evaluation, outputs, and the device (a plan counts bytes for any device), and
# the memory keep_graphs "auto" may use (a plan is given the device's: device_memory; it predicts
# "auto" at k = 0 and reports the largest k that fits, max_keep_graphs).
UNPLANNED_FIELDS = ("experts_dir", "data_root", "iterations", "match_epochs", "max_start_epoch",
                    "lr_img", "lr_lr", "lr_grad_clip", "beta_bound", "max_skipped", "lr_labels",
                    "momentum", "lr_init",
                    "label_init_confidence", "image_init", "eval_every", "eval_epochs",
                    "eval_models", "save_every", "snapshot_every", "device", "memory_budget")


@dataclass(frozen=True, init=False)
class PlanConfig:
    """A planned distillation: the run (a :class:`DistillConfig`) and what only planning needs.

    ``PlanConfig(distill, **fields)``: a keyword naming a planned field of the run (``ipc=1``,
    ``label_strategy="sla"``, ``keep_graphs=4``; :data:`PLANNED_FIELDS` less the swept ones) sets
    it in ``distill``, so ``PlanConfig(dataset="cifar10", ipc=1, syn_steps=(50,))`` reads as the
    command line does. The plan predicts every T of ``syn_steps`` for every method of ``methods``
    (the run's own ``syn_steps`` and ``method`` are swept, not read).
    """

    # the run planned: the fields of PLANNED_FIELDS are read (flags --dataset, --ipc, --batch-syn,
    # --label-strategy, --dsa, --state-stride, --microbatch-size, --keep-graphs, --seed); a plan
    # reads no experts, so it needs the dataset
    distill: DistillConfig = DistillConfig(dataset="cifar10", ipc=10)
    syn_steps: tuple[int, ...] = (10, 20, 40)  # T values to plan (the run's syn_steps, swept)
    # methods compared (the run's method, swept; the flag --method takes several values too)
    methods: tuple[str, ...] = choice(tuple(METHODS), METHODS)
    model: str = choice("convnet", ARCHITECTURES)  # the experts' network
    width: int | None = None  # ConvNet / ResNet width; None: the architecture's own default
    depth: int | None = None  # ConvNet blocks / ViT layers; None: the architecture's default
    dtype: str = choice("float32", DTYPES)  # of the images, labels and parameters
    device_memory: str | None = None  # e.g. "48GB", "80GiB", "24e9": adds fits and limits
    experts_on_device: int = 0  # further expert checkpoints kept on the device (parameter sets)
    # with device_memory: which limits to search for ("syn_steps": the largest T that fits,
    # "batch_syn": the largest batch at the largest planned T, "keep_graphs": for tesla and
    # exact, the largest keep_graphs at each planned T); each costs extra predictions
    limits: tuple[str, ...] = LIMITS
    extrapolate_above: int = 12  # T above this: predicted at two short T, extended linearly
    # a T limit up to this is checked by a direct prediction (about half a second per unrolled
    # step on a CPU)
    verify_max_steps: int = 100
    # a keep_graphs limit at a T up to this is checked by predicting the whole call at k and
    # k + 1 (two T-step calls per method, each about as slow as unrolled's); above it, k is read
    # off the line in k (an estimate)
    verify_keep_max_steps: int = 12

    # Written by hand (init=False) only to take the run's planned fields as keywords too; it sets
    # every field as the generated one would and validates.
    def __init__(self, distill: DistillConfig | None = None, **fields: Any) -> None:
        run = {k: fields.pop(k) for k in list(fields) if k in _RUN_KEYWORDS}
        distill = _DEFAULT_RUN if distill is None else distill
        object.__setattr__(self, "distill", dataclasses.replace(distill, **run) if run else distill)
        for f in dataclasses.fields(self)[1:]:
            object.__setattr__(self, f.name, fields.pop(f.name, f.default))
        if fields:
            raise TypeError(f"PlanConfig got unknown keywords {sorted(fields)}; it takes its "
                            f"fields and the run's planned ones: {', '.join(_RUN_KEYWORDS)}")
        self.__post_init__()

    def __post_init__(self) -> None:
        for name in ("syn_steps", "methods"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (int, str)) else
                               tuple(value))
        object.__setattr__(self, "limits", tuple(self.limits))
        dataset = self.distill.dataset
        if dataset is None:
            raise ValueError("the plan needs a dataset (DistillConfig.dataset, --dataset): it "
                             "reads no experts")
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
        try:
            shape(dataset)
        except KeyError as err:
            raise ValueError(err.args[0]) from err
        if self.model not in ARCHITECTURES:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(ARCHITECTURES)}")
        check_int(self, "verify_max_steps")
        check_int(self, "experts_on_device", "extrapolate_above", "verify_keep_max_steps", low=0)
        check_int(self, "width", "depth", optional=True)
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
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        if self.device_memory is not None:
            parse_bytes(self.device_memory)
        if any(name not in LIMITS for name in self.limits):
            raise ValueError(f"PlanConfig.limits {list(self.limits)} may hold {list(LIMITS)}")
        batch_syn = self.distill.batch_syn
        if batch_syn is not None and batch_syn > self.num_images:
            raise ValueError(
                f"batch_syn {batch_syn} is larger than the synthetic set: ipc {self.distill.ipc} "
                f"x {self.shape.num_classes} classes = {self.num_images} images. Lower batch_syn "
                "or raise ipc"
            )
        self.skeleton()  # the model must fit the dataset's images

    @property
    def shape(self) -> DatasetShape:
        return shape(self.distill.dataset)

    @property
    def num_images(self) -> int:
        """N, the synthetic images: ipc x classes."""
        return self.distill.ipc * self.shape.num_classes

    @property
    def batch(self) -> int:
        """B, the images of a student step."""
        if self.distill.batch_syn is not None:
            return self.distill.batch_syn
        s = self.shape  # None: the dataset's default, as the run resolves it
        defaults, _ = run_defaults(self.distill.dataset, s.channels, s.image_size)
        return batch_syn_for(defaults, self.num_images) or self.num_images

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
                f"model {self.model!r} {kw or ''} does not fit dataset {self.distill.dataset!r} "
                f"({s.channels}x{s.image_size}x{s.image_size}, {s.num_classes} classes): {err}"
            ) from err
        return model.to(self.torch_dtype)

    def to_dict(self) -> dict[str, Any]:
        """Flat: the run's planned fields (less the swept ones), then the plan's own;
        ``PlanConfig(**cfg.to_dict())`` plans the same."""
        run = {k: getattr(self.distill, k) for k in _RUN_KEYWORDS}
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)[1:]}
        return {**run, **own}


_RUN_KEYWORDS = tuple(k for k in PLANNED_FIELDS if k not in SWEPT_FIELDS)
_DEFAULT_RUN = PlanConfig.__dataclass_fields__["distill"].default

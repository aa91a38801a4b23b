"""What a distillation carries from one iteration to the next, and its atomic checkpoint file.

Everything that changes during a run lives in one :class:`DistillState`: the learned tensors, their
SGD momenta, the generator every random draw comes from, what is left of the minibatch
permutation, and the logs. It is written as one safetensors file (``checkpoint.safetensors``,
atomically: :mod:`tesla_func.fileio`) whose header holds the run's config, so a resumed run
continues from exactly this state and refuses a checkpoint of another config. A run on several
ranks writes the same file (rank 0 gathers the shards), and each rank of a resumed run reads its
shard of it (``load_checkpoint(..., shard=)``), whatever the number of ranks that wrote it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tesla_func.data import Dataset
from tesla_func.distill_config import DistillConfig
from tesla_func.fileio import load_tensors, save_tensors
from tesla_func.labels import LabelStrategy
from tesla_func.optim import SGDState, sgd
from tesla_func.sampling import per_class_indices
from tesla_func.types import Params

FORMAT = "tesla_func.distill_checkpoint"
LOG_FIELDS = (
    "loss",  # the normalised matching loss L of the iteration
    "lr",  # beta after the update
    "images_grad_norm",
    "labels_grad_norm",  # NaN unless the strategy learns label logits
    "lr_grad_norm",  # |dL/dlog(beta)| before clipping
    "skipped",  # 1 if a non-finite loss, gradient or updated value skipped the update
    "expert",  # which expert was matched
    "start_epoch",  # its start epoch t
    "seconds",  # wall time of the iteration
    # fraction of the images whose teacher label (the argmax of the labels the iteration trained
    # on; the class itself for hard labels) is not the class the image started in
    "label_drift",
    "images_norm",  # root mean square of the images' L2 norms after the update
)
# Per-class fields: one list of K values per iteration (a (iteration, class) variable in log.nc).
CLASS_LOG_FIELDS = (
    "class_count",  # images per class by that argmax; they sum to N
)
# config fields a resumed run may give another value: when to stop for skipped updates
RESUMABLE_CHANGES = ("max_skipped",)
# the tensors (and momenta) with one row per synthetic image: on several ranks each holds its rows
ROW_SHARDED = ("images", "label_logits")
# per evaluation: test accuracy, and validation accuracy (what choices of an iteration use)
EVAL_FIELDS = ("iteration", "accuracy_mean", "accuracy_std", "val_accuracy_mean",
               "val_accuracy_std")


@dataclass
class DistillState:
    """Everything that changes during distillation."""

    iteration: int  # iterations done
    images: Tensor  # (N, C, H, W) the synthetic images X
    label_logits: Tensor | None  # (N, K) learned label logits Y, if the strategy learns them
    log_lr: Tensor  # () log(beta): beta = exp(log_lr) stays positive
    momentum: SGDState  # SGD momenta of the learned tensors, keyed like learned()
    generator: torch.Generator  # every random draw of the run (experts, epochs, batches, DSA)
    order: Tensor  # (n,) what is left of the current minibatch permutation
    # LOG_FIELDS: one value per iteration; CLASS_LOG_FIELDS: one list of K values per iteration
    log: dict[str, list]
    evals: dict[str, list[float]]  # EVAL_FIELDS, one value per evaluation
    skipped: int  # updates skipped because something was not finite
    # the run's warnings so far, by kind (tesla_func.runchecks.warn): each is given once
    warnings: dict[str, str] = field(default_factory=dict)

    def learned(self, strategy: LabelStrategy) -> Params:
        """The tensors ``strategy`` learns, by name: log(beta) always, the images and the label
        logits if it says so."""
        keep = {"log_lr", *(["images"] if strategy.learns_images else []),
                *(["label_logits"] if strategy.learns_logits else [])}
        return {k: v for k, v in self.tensors().items() if k in keep}

    def tensors(self) -> Params:
        """The learnable tensors by name (whether learned or frozen by the strategy)."""
        out = {"images": self.images, "log_lr": self.log_lr}
        if self.label_logits is not None:
            out["label_logits"] = self.label_logits
        return out


def save_checkpoint(path: Path, config: dict[str, Any], state: DistillState) -> None:
    """Write ``state`` atomically, with the run's ``config`` (a JSON-able dict) in the header."""
    tensors = {**state.tensors(), "generator": state.generator.get_state(), "order": state.order}
    tensors.update({f"momentum/{k}": v for k, v in state.momentum.momentum.items()})
    for name, values in {**state.log, **{f"eval_{k}": v for k, v in state.evals.items()}}.items():
        tensors[f"log/{name}"] = torch.tensor(values, dtype=torch.float64)
    header = {
        "format": FORMAT,
        "config": config,
        "iteration": state.iteration,
        "skipped": state.skipped,
        "warnings": state.warnings,
    }
    save_tensors(path, tensors, header)


def load_checkpoint(
    path: Path, config: dict[str, Any], device: torch.device, shard: slice | None = None
) -> DistillState:
    """Read a checkpoint written by :func:`save_checkpoint` for the same ``config``.

    ``shard``: keep only these rows of the images, label logits and their momenta (a rank's
    shard, :data:`ROW_SHARDED`); the file always holds the whole set, so a run resumes on any
    number of ranks.

    A field missing from the file's config (one added to :class:`DistillConfig` since) counts as
    its default, so a run resumes across versions unless it sets that field.

    Raises ``ValueError`` listing the differing fields (but those of :data:`RESUMABLE_CHANGES`)
    when it belongs to another run, and naming
    the file when it is truncated or of another kind.
    """
    tensors, header = load_tensors(path)
    saved = header.get("config")
    if header.get("format") != FORMAT or not isinstance(saved, dict):
        raise ValueError(f"{path} is not a tesla_func distillation checkpoint; delete it")
    now = json.loads(json.dumps(config))
    # a field DistillConfig gained after the file was written reads as its default there
    added = {k: v for k, v in DistillConfig().to_dict().items() if k in now and k not in saved}
    saved = {**added, **saved}
    for name in RESUMABLE_CHANGES:  # a resumed run may change these: they change no state
        saved.pop(name, None), now.pop(name, None)
    if saved != now:
        diffs = [
            f"{k}: saved {saved.get(k)!r} vs now {v!r}"
            for k, v in now.items()
            if saved.get(k) != v
        ]
        diffs += [f"{k}: saved {saved[k]!r}, gone now" for k in saved if k not in now]
        raise ValueError(
            f"{path} belongs to another run ({'; '.join(diffs[:8])}); use another "
            "output directory or the same config"
        )
    gen = torch.Generator()
    gen.set_state(tensors["generator"])
    if shard is not None:
        tensors = {k: v[shard].clone() if k.removeprefix("momentum/") in ROW_SHARDED else v
                   for k, v in tensors.items()}
    on = {k: v.to(device) for k, v in tensors.items() if not k.startswith("log/")}
    return DistillState(
        iteration=int(header["iteration"]),
        images=on["images"],
        label_logits=on.get("label_logits"),
        log_lr=on["log_lr"],
        momentum=SGDState(
            {k.removeprefix("momentum/"): v for k, v in on.items() if k.startswith("momentum/")}
        ),
        generator=gen,
        order=tensors["order"],
        # a field LOG_FIELDS gained after the file was written: NaN at its iterations
        log={f: tensors[f"log/{f}"].tolist() if f"log/{f}" in tensors
             else [math.nan] * int(header["iteration"]) for f in LOG_FIELDS + CLASS_LOG_FIELDS},
        evals={f: tensors[f"log/eval_{f}"].tolist() for f in EVAL_FIELDS},
        skipped=int(header["skipped"]),
        warnings=dict(header.get("warnings", {})),
    )


def initial_state(
    cfg: DistillConfig, dataset: Dataset, beta0: float, device: torch.device,
    shard: slice | None = None,
) -> DistillState:
    """The state before iteration 1: images from ``ipc`` random real images of every class (or
    noise of their shape), the strategy's initial logits, log(beta0), zero momenta.

    ``shard``: only these rows of the images and logits (a rank's shard); the generator draws what
    it draws for the whole set, so every rank's generator continues alike."""
    gen = torch.Generator().manual_seed(cfg.seed)
    k = dataset.info.num_classes
    index = per_class_indices(dataset.train_labels, cfg.ipc, gen, k, dataset.info.class_names)
    if cfg.image_init == "real":
        images = dataset.train_images[index if shard is None else index[shard]].clone()
    else:
        images = torch.randn(dataset.train_images[index].shape, generator=gen)
        images = images if shard is None else images[shard].clone()
    images = images.to(device)
    strategy = cfg.strategy
    logits = None
    if strategy.initial_logits is not None:
        classes = torch.arange(k).repeat_interleave(cfg.ipc)
        classes = classes if shard is None else classes[shard]
        logits = strategy.initial_logits(classes, k, cfg.label_init_confidence, images.dtype)
        logits = logits.to(device)
    log_lr = torch.tensor(math.log(beta0), dtype=images.dtype, device=device)
    state = DistillState(
        iteration=0, images=images, label_logits=logits, log_lr=log_lr, momentum=None,
        generator=gen, order=torch.zeros(0, dtype=torch.long),
        log={f: [] for f in LOG_FIELDS + CLASS_LOG_FIELDS},
        evals={f: [] for f in EVAL_FIELDS}, skipped=0,
    )
    state.momentum = sgd(cfg.momentum).init(state.learned(strategy))
    return state

"""Distillation by trajectory matching (Algorithm 1 of MTT / TESLA) with every label strategy.

Each iteration:

1. pick an expert e ~ U{experts} and a start epoch t ~ U{0 .. max_start_epoch - 1};
   start = theta*_{e,t}, target = theta*_{e,t+M} with M = ``expert_epochs``;
2. draw T = ``syn_steps`` non-overlapping minibatches of ``batch_syn`` synthetic images (a fresh
   permutation when one runs out) and the DSA parameters of every step (replayed in every pass);
3. labels for this iteration (see :data:`LABEL_STRATEGIES`);
4. ``match_trajectory(..., method=cfg.method)`` -> L and dL/dX, dL/dY, dL/dbeta;
5. SGD with momentum on the images, the label logits (``learned``) and log(beta).

The student learning rate is kept positive by its parametrisation beta = exp(log_beta): the
update is on log_beta, with dL/dlog_beta = beta * dL/dbeta. A non-finite loss or gradient skips
the whole update; the skip is counted and logged (users of the public code report NaN losses and
beta exploding or turning negative; nothing guarded against them there). ``lr_grad_clip`` bounds
how far beta can move in one iteration: a single bad segment once sent beta from 0.19 to 0.003
(|dL/dlog_beta| = 4.3 against a typical 0.05-0.3), after which the student no longer moved and
the image gradient was zero for the rest of the run.

State that persists (images, logits, log_beta, momenta, the generator, the log) is checkpointed
atomically every ``checkpoint_every`` iterations; a resumed run continues from the same state and,
on CPU with the same seed, ends with bitwise the same synthetic set as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from tqdm.auto import tqdm

from tesla_func.augment import DSA
from tesla_func.data import Dataset, load_dataset
from tesla_func.evaluate import EvalConfig, evaluate
from tesla_func.experts import ExpertTrajectory, load_experts
from tesla_func.fileio import load_tensors, save_tensors
from tesla_func.matching import METHODS, match_trajectory
from tesla_func.models import ConvNet
from tesla_func.provenance import provenance
from tesla_func.results import make_dataset, save_dataset

LABEL_STRATEGIES: dict[str, str] = {
    "hard": "class indices; cross-entropy against one-hot",
    "sla": "Soft Label Assignment: softmax(teacher(X)), teacher = the expert at the target epoch",
    "sla-last": "SLA with the teacher at the expert's last epoch",
    "learned": "label logits Y initialised near one-hot, learned with their own lr",
    "sla-only": "SLA labels on frozen real images: only beta is learned",
}
INITS = ("real", "noise")
FORMAT = "tesla_func.synthetic"
_CHECKPOINT = "checkpoint.safetensors"


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run; saved with every output. Defaults: a small Fashion-MNIST run."""

    experts_dir: str = "cache/experts/fashion-mnist-w32"  # expert_*.safetensors to match
    dataset: str = "fashion-mnist"  # must be the experts' dataset
    data_root: str | None = None  # where the dataset files are (None: default locations)
    ipc: int = 1  # synthetic images per class
    method: str = "tesla"  # gradient method: a key of tesla_func.matching.METHODS
    labels: str = "hard"  # a key of LABEL_STRATEGIES
    iterations: int = 200  # image updates
    syn_steps: int = 20  # T, student steps per iteration
    expert_epochs: int = 2  # M, target = start epoch + M
    max_start_epoch: int = 4  # start epoch t ~ U{0 .. max_start_epoch - 1}
    batch_syn: int | None = None  # synthetic images per student step; None = the whole set
    lr_img: float = 1000.0  # SGD lr of the images
    # SGD lr of log(beta) (beta = exp(log_beta) stays positive). A raw-beta lr r (the papers'
    # lr_lr, 1e-7..1e-5) is about r / beta^2 here: 0.1..10 for beta = 0.01..0.001.
    lr_lr: float = 1.0
    # |dL/dlog(beta)| is clipped to this before the update (None: no clip), so one iteration
    # changes log(beta) by at most lr_lr * lr_grad_clip (before momentum)
    lr_grad_clip: float | None = None
    lr_labels: float = 10.0  # SGD lr of the label logits ("learned")
    momentum: float = 0.5  # SGD momentum of images, logits and log(beta)
    lr_init: float | None = None  # initial beta; None = the experts' training lr
    label_init_confidence: float = 0.9  # "learned": initial softmax mass on the true class
    init: str = "real"  # "real": random real images of each class; "noise": N(0, 1)
    dsa: bool = True  # replayed DSA on the synthetic minibatches
    eval_every: int = 0  # evaluate every N iterations (0: only at the end)
    eval_epochs: int = 300  # evaluation protocol: epochs (the paper: 1000)
    eval_models: int = 3  # evaluation protocol: networks trained per evaluation
    checkpoint_every: int = 25  # iterations between atomic checkpoints
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in (
            "ipc",
            "iterations",
            "syn_steps",
            "expert_epochs",
            "max_start_epoch",
            "eval_epochs",
            "eval_models",
            "checkpoint_every",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DistillConfig.{name} must be an int >= 1, got {value!r}")
        if self.batch_syn is not None and (
            not isinstance(self.batch_syn, int) or self.batch_syn < 1
        ):
            raise ValueError(
                f"DistillConfig.batch_syn must be None or an int >= 1, got {self.batch_syn!r}"
            )
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(
                f"DistillConfig.eval_every must be an int >= 0, got {self.eval_every!r}"
            )
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {sorted(METHODS)}")
        if self.labels not in LABEL_STRATEGIES:
            raise ValueError(
                f"unknown label strategy {self.labels!r}; known: {sorted(LABEL_STRATEGIES)}"
            )
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; known: {INITS}")
        for name in ("lr_img", "lr_lr", "lr_labels"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"DistillConfig.{name} must be finite and >= 0, got {value}")
        if self.lr_grad_clip is not None and not (
            math.isfinite(self.lr_grad_clip) and self.lr_grad_clip > 0
        ):
            raise ValueError(
                f"DistillConfig.lr_grad_clip must be None or finite and > 0, got {self.lr_grad_clip}"
            )
        if self.lr_init is not None and not (math.isfinite(self.lr_init) and self.lr_init > 0):
            raise ValueError(f"DistillConfig.lr_init must be finite and > 0, got {self.lr_init}")
        if not 0 < self.label_init_confidence < 1:
            raise ValueError("DistillConfig.label_init_confidence must lie in (0, 1)")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"DistillConfig.momentum must lie in [0, 1), got {self.momentum}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def learns_images(self) -> bool:
        return self.labels != "sla-only"


@dataclass(frozen=True, eq=False)
class SyntheticSet:
    """A distilled set: what evaluation trains on."""

    images: Tensor  # (N, C, H, W), in the dataset's normalised (maybe whitened) space
    labels: Tensor  # (N,) int64 classes, or (N, K) probabilities (soft strategies, learned)
    lr: float  # the learned student lr beta: evaluation trains with it
    label_logits: Tensor | None  # (N, K) the learned logits ("learned" only)
    header: dict  # config, provenance, skipped-update count, ...

    def save(self, path: str | Path) -> None:
        tensors = {
            "images": self.images,
            "labels": self.labels,
            "lr": torch.tensor(self.lr, dtype=torch.float64),
        }
        if self.label_logits is not None:
            tensors["label_logits"] = self.label_logits
        save_tensors(path, tensors, self.header)


def load_synthetic(path: str | Path) -> SyntheticSet:
    """Read a synthetic set written by :meth:`SyntheticSet.save` (clear errors on bad files)."""
    tensors, header = load_tensors(path)
    if header.get("format") != FORMAT or not {"images", "labels", "lr"} <= set(tensors):
        raise ValueError(
            f"{path} is not a tesla_func synthetic set (format "
            f"{header.get('format')!r}, tensors {sorted(tensors)})"
        )
    return SyntheticSet(
        tensors["images"],
        tensors["labels"],
        float(tensors["lr"]),
        tensors.get("label_logits"),
        header,
    )


# ----------------------------------------------------------------------------------------------
# Set-up: experts, data and the initial state, every check before any work starts.


@dataclass
class _State:
    """Everything that changes during distillation (checkpointed as one safetensors file)."""

    iteration: int  # iterations done
    images: Tensor  # (N, C, H, W)
    label_logits: Tensor | None  # (N, K), "learned" only
    log_lr: Tensor  # () log beta
    images_momentum: Tensor
    logits_momentum: Tensor | None
    log_lr_momentum: Tensor
    generator: torch.Generator
    order: Tensor  # (n,) what is left of the current minibatch permutation
    log: dict[str, list[float]]  # per iteration
    evals: dict[str, list[float]]  # per evaluation
    skipped: int  # updates skipped because something was not finite


_LOG_FIELDS = (
    "loss",
    "lr",
    "images_grad_norm",
    "labels_grad_norm",
    "lr_grad_norm",
    "skipped",
    "expert",
    "start_epoch",
    "seconds",
)
_EVAL_FIELDS = ("iteration", "accuracy_mean", "accuracy_std")


def _check_experts(cfg: DistillConfig, experts: list[ExpertTrajectory]) -> None:
    expert = experts[0]
    if expert.dataset != cfg.dataset:
        raise ValueError(
            f"the experts in {cfg.experts_dir} were trained on {expert.dataset!r}, "
            f"but the config distils {cfg.dataset!r}"
        )
    last_needed = cfg.max_start_epoch - 1 + cfg.expert_epochs
    shortest = min(e.epochs for e in experts)
    if last_needed > shortest:
        raise ValueError(
            f"max_start_epoch {cfg.max_start_epoch} with expert_epochs "
            f"{cfg.expert_epochs} needs checkpoints up to epoch {last_needed}, but the "
            f"experts in {cfg.experts_dir} have {shortest} epochs"
        )


def _check_sizes(cfg: DistillConfig, dataset: Dataset) -> int:
    counts = torch.bincount(dataset.train_labels, minlength=dataset.info.num_classes)
    smallest = int(counts.min())
    if cfg.ipc > smallest:
        raise ValueError(
            f"ipc {cfg.ipc} is larger than the smallest class of {cfg.dataset} "
            f"({smallest} training images)"
        )
    n = cfg.ipc * dataset.info.num_classes
    if cfg.batch_syn is not None and cfg.batch_syn > n:
        raise ValueError(
            f"batch_syn {cfg.batch_syn} is larger than the synthetic set "
            f"(ipc {cfg.ipc} x {dataset.info.num_classes} classes = {n} images)"
        )
    return n


def _initial_state(
    cfg: DistillConfig, dataset: Dataset, beta0: float, device: torch.device
) -> _State:
    gen = torch.Generator().manual_seed(cfg.seed)
    k = dataset.info.num_classes
    picks = []
    for c in range(k):  # ipc random real images of every class
        members = torch.nonzero(dataset.train_labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=gen)[: cfg.ipc]])
    index = torch.cat(picks)
    if cfg.init == "real":
        images = dataset.train_images[index].clone()
    else:
        images = torch.randn(dataset.train_images[index].shape, generator=gen)
    images = images.to(device)
    logits = None
    if cfg.labels == "learned":
        # Near one-hot: softmax puts label_init_confidence on the true class, the rest uniform.
        p = cfg.label_init_confidence
        margin = math.log(p * (k - 1) / (1 - p))
        classes = torch.arange(k).repeat_interleave(cfg.ipc)
        logits = (margin * F.one_hot(classes, k).to(images.dtype)).to(device)
    log_lr = torch.tensor(math.log(beta0), dtype=images.dtype, device=device)
    return _State(
        iteration=0,
        images=images,
        label_logits=logits,
        log_lr=log_lr,
        images_momentum=torch.zeros_like(images),
        logits_momentum=None if logits is None else torch.zeros_like(logits),
        log_lr_momentum=torch.zeros_like(log_lr),
        generator=gen,
        order=torch.zeros(0, dtype=torch.long),
        log={f: [] for f in _LOG_FIELDS},
        evals={f: [] for f in _EVAL_FIELDS},
        skipped=0,
    )


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _save_checkpoint(path: Path, cfg: DistillConfig, state: _State) -> None:
    tensors = {
        "images": state.images,
        "log_lr": state.log_lr,
        "images_momentum": state.images_momentum,
        "log_lr_momentum": state.log_lr_momentum,
        "generator": state.generator.get_state(),
        "order": state.order,
    }
    if state.label_logits is not None:
        tensors["label_logits"] = state.label_logits
        tensors["logits_momentum"] = state.logits_momentum
    for name, values in {**state.log, **{f"eval_{k}": v for k, v in state.evals.items()}}.items():
        tensors[f"log/{name}"] = torch.tensor(values, dtype=torch.float64)
    header = {
        "format": "tesla_func.distill_checkpoint",
        "config": cfg.to_dict(),
        "iteration": state.iteration,
        "skipped": state.skipped,
    }
    save_tensors(path, tensors, header)


def _load_checkpoint(path: Path, cfg: DistillConfig, device: torch.device) -> _State:
    tensors, header = load_tensors(path)
    saved = header.get("config")
    if saved != json.loads(json.dumps(cfg.to_dict())):
        diffs = [
            f"{k}: saved {saved.get(k)!r} vs now {v!r}"
            for k, v in cfg.to_dict().items()
            if saved is None or saved.get(k) != v
        ]
        raise ValueError(
            f"{path} belongs to another run ({'; '.join(diffs[:8])}); use another "
            "output directory or the same config"
        )
    gen = torch.Generator()
    gen.set_state(tensors["generator"])
    on = {k: v.to(device) for k, v in tensors.items() if not k.startswith("log/")}
    return _State(
        iteration=int(header["iteration"]),
        images=on["images"],
        label_logits=on.get("label_logits"),
        log_lr=on["log_lr"],
        images_momentum=on["images_momentum"],
        logits_momentum=on.get("logits_momentum"),
        log_lr_momentum=on["log_lr_momentum"],
        generator=gen,
        order=tensors["order"],
        log={f: tensors[f"log/{f}"].tolist() for f in _LOG_FIELDS},
        evals={f: tensors[f"log/eval_{f}"].tolist() for f in _EVAL_FIELDS},
        skipped=int(header["skipped"]),
    )


# ----------------------------------------------------------------------------------------------
# One iteration


def _minibatches(state: _State, n: int, batch: int, steps: int) -> list[Tensor]:
    """T non-overlapping minibatches, drawing a fresh permutation whenever the current runs out."""
    out = []
    for _ in range(steps):
        if len(state.order) < batch:
            state.order = torch.randperm(n, generator=state.generator)
        out.append(state.order[:batch])
        state.order = state.order[batch:]
    return out


def _teacher_logits(model: ConvNet, params: dict[str, Tensor], images: Tensor) -> Tensor:
    """(N, K) logits of the teacher on un-augmented images, in eval mode, without a graph."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return functional_call(model, params, (images,), strict=True)
    finally:
        model.train(was_training)


def _sgd(
    param: Tensor, grad: Tensor, momentum: Tensor, lr: float, mu: float
) -> tuple[Tensor, Tensor]:
    """torch.optim.SGD (no dampening): buf = mu * buf + g; p = p - lr * buf."""
    momentum = mu * momentum + grad
    return param - lr * momentum, momentum


class Distiller:
    """Runs :class:`DistillConfig`; ``run()`` returns the synthetic set and writes ``out_dir``."""

    def __init__(
        self,
        cfg: DistillConfig,
        out_dir: str | Path,
        *,
        progress: bool = True,
        dataset: Dataset | None = None,
        experts: list[ExpertTrajectory] | None = None,
    ):
        self.cfg, self.out, self.progress = cfg, Path(out_dir), progress
        self.device = torch.device(cfg.device)
        self.experts = experts if experts is not None else load_experts(cfg.experts_dir)
        _check_experts(cfg, self.experts)
        self.experts = [e.to(self.device) for e in self.experts]
        zca = bool(self.experts[0].header.get("dataset_info", {}).get("zca", False))
        self.dataset = (
            dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_root, zca=zca)
        )
        if self.dataset.info.name != self.experts[0].dataset:
            raise ValueError(
                f"dataset {self.dataset.info.name!r} is not the experts' "
                f"{self.experts[0].dataset!r}"
            )
        self.n = _check_sizes(cfg, self.dataset)
        self.model = ConvNet(self.experts[0].config).to(self.device)
        self.beta0 = cfg.lr_init if cfg.lr_init is not None else self.experts[0].lr
        self.dsa = DSA() if cfg.dsa else None
        self.classes = torch.arange(
            self.dataset.info.num_classes, device=self.device
        ).repeat_interleave(cfg.ipc)
        self.last_eval = None  # the EvalResult of the latest evaluation this process made
        checkpoint = self.out / _CHECKPOINT
        self.state = (
            _load_checkpoint(checkpoint, cfg, self.device)
            if checkpoint.exists()
            else _initial_state(cfg, self.dataset, self.beta0, self.device)
        )

    # -- labels ---------------------------------------------------------------------------------

    def _labels_for(self, expert: ExpertTrajectory, target_epoch: int) -> Tensor:
        """The labels this iteration matches with: (N,) classes or (N, K) logits."""
        s, strategy = self.state, self.cfg.labels
        if strategy == "hard":
            return self.classes
        if strategy == "learned":
            return s.label_logits
        epoch = expert.epochs if strategy == "sla-last" else target_epoch
        return _teacher_logits(self.model, expert.params[epoch], s.images)

    def final_labels(self) -> Tensor:
        """Labels the evaluation trains with: classes, or probabilities for soft strategies.

        SLA strategies use expert 0 as the teacher, at the latest target epoch any iteration
        could match (``max_start_epoch - 1 + expert_epochs``; the last epoch for ``sla-last``).
        """
        s, cfg = self.state, self.cfg
        if cfg.labels == "hard":
            return self.classes
        if cfg.labels == "learned":
            return F.softmax(s.label_logits, dim=-1)
        expert = self.experts[0]
        epoch = (
            expert.epochs
            if cfg.labels == "sla-last"
            else cfg.max_start_epoch - 1 + cfg.expert_epochs
        )
        return F.softmax(_teacher_logits(self.model, expert.params[epoch], s.images), dim=-1)

    # -- the loop -------------------------------------------------------------------------------

    def step(self) -> None:
        """One iteration of Algorithm 1 (updates self.state)."""
        cfg, s = self.cfg, self.state
        tic = time.perf_counter()
        e = int(torch.randint(len(self.experts), (1,), generator=s.generator))
        t = int(torch.randint(cfg.max_start_epoch, (1,), generator=s.generator))
        expert = self.experts[e]
        batch = cfg.batch_syn or self.n
        batches = [b.to(self.device) for b in _minibatches(s, self.n, batch, cfg.syn_steps)]
        augment = (
            self.dsa.replayable(
                [batch] * cfg.syn_steps, s.generator, device=self.device, dtype=s.images.dtype
            )
            if self.dsa is not None
            else None
        )
        labels = self._labels_for(expert, t + cfg.expert_epochs)
        beta = s.log_lr.exp()
        res = match_trajectory(
            self.model,
            expert.params[t],
            expert.params[t + cfg.expert_epochs],
            s.images,
            labels,
            beta,
            batches,
            method=cfg.method,
            augment=augment,
        )
        lr_grad = res.lr_grad * beta  # dL/dlog_beta
        parts = [res.loss, res.images_grad, lr_grad]
        if cfg.labels == "learned":
            parts.append(res.labels_grad)
        finite = all(bool(torch.isfinite(p).all()) for p in parts)
        if finite:
            if cfg.learns_images:
                s.images, s.images_momentum = _sgd(
                    s.images, res.images_grad, s.images_momentum, cfg.lr_img, cfg.momentum
                )
            if cfg.labels == "learned":
                s.label_logits, s.logits_momentum = _sgd(
                    s.label_logits, res.labels_grad, s.logits_momentum, cfg.lr_labels, cfg.momentum
                )
            clipped = (
                lr_grad
                if cfg.lr_grad_clip is None
                else lr_grad.clamp(-cfg.lr_grad_clip, cfg.lr_grad_clip)
            )
            s.log_lr, s.log_lr_momentum = _sgd(
                s.log_lr, clipped, s.log_lr_momentum, cfg.lr_lr, cfg.momentum
            )
        else:
            s.skipped += 1
        s.iteration += 1
        norm = lambda x: float(x.norm()) if x is not None else float("nan")
        for name, value in (
            ("loss", float(res.loss)),
            ("lr", float(s.log_lr.exp())),
            ("images_grad_norm", norm(res.images_grad)),
            (
                "labels_grad_norm",
                norm(res.labels_grad) if cfg.labels == "learned" else float("nan"),
            ),
            ("lr_grad_norm", float(lr_grad.abs())),
            ("skipped", float(not finite)),
            ("expert", float(e)),
            ("start_epoch", float(t)),
            ("seconds", time.perf_counter() - tic),
        ):
            s.log[name].append(value)

    def synthetic_set(self) -> SyntheticSet:
        s = self.state
        header = {
            "format": FORMAT,
            "config": self.cfg.to_dict(),
            "iteration": s.iteration,
            "skipped_updates": s.skipped,
            "dataset_info": self.dataset.info.to_dict(),
            "architecture": self.experts[0].config.to_dict(),
            "provenance": provenance(self.device),
        }
        return SyntheticSet(
            s.images.detach().cpu(),
            self.final_labels().detach().cpu(),
            float(s.log_lr.exp()),
            None if s.label_logits is None else s.label_logits.detach().cpu(),
            header,
        )

    def protocol(self, lr: float, arch: str = "convnet", **arch_kwargs: Any) -> EvalConfig:
        """The evaluation protocol of this run (PROTOCOL.md section 6 with cfg.eval_epochs and
        cfg.eval_models); ``arch="convnet"`` is the experts' own architecture."""
        if arch == "convnet" and not arch_kwargs:
            c = self.experts[0].config
            arch_kwargs = {"width": c.width, "depth": c.depth, "norm": c.norm}
        return EvalConfig(
            arch=arch,
            arch_kwargs=arch_kwargs,
            epochs=self.cfg.eval_epochs,
            lr=lr,
            num_models=self.cfg.eval_models,
            seed=self.cfg.seed,
            device=self.cfg.device,
            progress=False,
        )

    def evaluate(self, synthetic: SyntheticSet | None = None, protocol: EvalConfig | None = None):
        """Train fresh networks on the synthetic set (with its learned lr) and test them."""
        synthetic = synthetic or self.synthetic_set()
        protocol = protocol or self.protocol(lr=synthetic.lr)
        return evaluate(
            synthetic.images,
            synthetic.labels,
            self.dataset.test_images,
            self.dataset.test_labels,
            protocol,
            DSA() if self.cfg.dsa else None,
            num_classes=self.dataset.info.num_classes,
        )

    def _record_eval(self) -> None:
        result = self.last_eval = self.evaluate()
        s = self.state
        for name, value in (
            ("iteration", s.iteration),
            ("accuracy_mean", result.mean),
            ("accuracy_std", result.std),
        ):
            s.evals[name].append(float(value))
        tqdm.write(f"iteration {s.iteration}: test accuracy {result}")

    def log_dataset(self):
        """The per-iteration log and the evaluations as one xarray Dataset."""
        s = self.state
        iters = np.arange(1, len(s.log["loss"]) + 1)
        data = {
            name: (("iteration",), np.asarray(values, dtype=np.float64))
            for name, values in s.log.items()
        }
        data["eval_accuracy_mean"] = (("eval_iteration",), np.asarray(s.evals["accuracy_mean"]))
        data["eval_accuracy_std"] = (("eval_iteration",), np.asarray(s.evals["accuracy_std"]))
        coords = {
            "iteration": iters,
            "eval_iteration": np.asarray(s.evals["iteration"], dtype=np.int64),
        }
        return make_dataset(
            data,
            coords,
            config=self.cfg,
            seed=self.cfg.seed,
            device=self.cfg.device,
            skipped_updates=s.skipped,
            method=self.cfg.method,
            labels=self.cfg.labels,
            ipc=self.cfg.ipc,
        )

    def run(self, stop_after: int | None = None) -> SyntheticSet:
        """Run (or resume) to ``cfg.iterations``; ``stop_after`` stops early (tests of resume).

        Writes ``out_dir/checkpoint.safetensors`` every ``checkpoint_every`` iterations and, at
        the end, ``out_dir/synthetic.safetensors`` and ``out_dir/log.nc``.
        """
        cfg, s = self.cfg, self.state
        self.out.mkdir(parents=True, exist_ok=True)
        last = cfg.iterations if stop_after is None else min(cfg.iterations, stop_after)
        bar = tqdm(
            total=cfg.iterations,
            initial=s.iteration,
            desc=f"distill {cfg.method}/{cfg.labels} ipc{cfg.ipc}",
            unit="it",
            disable=not self.progress,
        )
        while s.iteration < last:
            self.step()
            bar.update(1)
            bar.set_postfix(
                loss=f"{s.log['loss'][-1]:.4f}", lr=f"{s.log['lr'][-1]:.2e}", skipped=s.skipped
            )
            if (
                cfg.eval_every
                and s.iteration % cfg.eval_every == 0
                and s.iteration < cfg.iterations
            ):
                self._record_eval()
            if s.iteration % cfg.checkpoint_every == 0 or s.iteration == last:
                _save_checkpoint(self.out / _CHECKPOINT, cfg, s)
        bar.close()
        synthetic = self.synthetic_set()
        if s.iteration >= cfg.iterations:
            if not s.evals["iteration"] or s.evals["iteration"][-1] != s.iteration:
                self._record_eval()
                _save_checkpoint(self.out / _CHECKPOINT, cfg, s)
            synthetic.save(self.out / "synthetic.safetensors")
            save_dataset(self.log_dataset(), self.out / "log.nc")
        return synthetic


def distill(cfg: DistillConfig, out_dir: str | Path, **kwargs: Any) -> SyntheticSet:
    """Run (or resume) a distillation into ``out_dir``: see :class:`Distiller`."""
    return Distiller(cfg, out_dir, **kwargs).run()

"""Evaluate a (distilled or real) training set: train fresh networks on it, test on real data.

The protocol of MTT / TESLA (docs/reference.md section 6): a freshly initialised network is trained on
the set with SGD (lr = the learned beta for a distilled set, momentum 0.9, weight decay 5e-4,
batch 256) for E epochs, the lr multiplied by 0.1 from epoch E // 2 on, DSA on every batch; the
test accuracy on the real test set after the last epoch is reported as mean +- std over K models.

Two engines give the same numbers:

``vmap``
    the K models are trained at once: their parameters are stacked with
    :func:`torch.func.stack_module_state`-style ``(K, ...)`` dicts, the functional loss gradient of
    one model is lifted with ``vmap(grad(loss))`` over (params, x, y), and the functional SGD of
    :mod:`tesla_func.optim` updates the stacked dicts. Models with buffers (BatchNorm) do not take
    this path.
``loop``
    one ``nn.Module`` per model, trained one after another with ``loss.backward()`` and the same
    functional SGD (bitwise :class:`torch.optim.SGD` on CPU): the reference for the vmap engine,
    and the path for BatchNorm models.

``config.use_vmap=None`` (the default) picks vmap on CUDA and the loop on CPU: on the shared 2-core
CPU here vmap ran at 0.37-0.41x the loop's speed end to end (K=5 ConvNet width 32, 100 images
1x28x28, 300 epochs, with and without DSA; experiments/bench_eval_vmap.py) and 0.5-0.7x per step.
The CUDA default is the usual expectation for small models, not measured here.

Model ``k`` draws everything from three generators seeded from ``(config.seed, k)`` only
(:func:`tesla_func.sampling.seeded_generator`): its initial weights, its batch order (one
permutation per epoch) and its augmentation (one ``augment`` call per batch). So the engines agree,
and model ``k`` is the same network whatever K is.

Labels are hard ``(N,)`` class indices or soft ``(N, K)`` *probabilities* (rows summing to 1),
trained with cross-entropy against those probabilities. A distilled set with learned label
*logits* is evaluated with ``labels=torch.softmax(logits, dim=1)``.

Several processes (``evaluate(..., group=...)``): model k trains on rank k % W and the ranks'
accuracies are summed into every rank's result, so W ranks report the numbers of one process
(each model is the same network wherever it trains; bitwise on CPU with the same threads).

Deviation from the public MTT code, on purpose: it trains E + 1 epochs and re-creates the optimiser
at the lr drop (discarding the momentum buffer); here the momentum buffer carries across the drop,
as with an lr scheduler, and exactly E epochs run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from tesla_func import distributed
from tesla_func.configargs import check_choices, check_int, choice
from tesla_func.models import ARCHITECTURES, build_model, init_params
from tesla_func.optim import sgd
from tesla_func.runchecks import check_device
from tesla_func.sampling import seeded_generator
from tesla_func.tracking import RunLogger
from tesla_func.types import Params, RandomAugment

_SOFT_LABEL_ATOL = 1e-3  # rows of soft labels must sum to 1 within this (float32 softmax: ~1e-6)


@dataclass(frozen=True)
class EvalConfig:
    """How a set is evaluated; saved with every result."""

    arch: str = choice("convnet", ARCHITECTURES)  # the network trained on the set
    # keyword arguments of the architecture, e.g. {"width": 32, "norm": "batch"}
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # E, passes over the training set: 1000 is the papers' protocol (distillation's own
    # evaluation, DistillConfig.eval_epochs, trains 300 to stay short)
    epochs: int = 1000
    lr: float = 0.01  # SGD lr for epochs [0, lr_decay_epoch); a distilled set's learned beta
    lr_decay_epoch: int | None = None  # first epoch at lr * lr_decay_factor; None -> epochs // 2
    lr_decay_factor: float = 0.1  # the lr is multiplied by this from lr_decay_epoch on
    momentum: float = 0.9  # SGD momentum (torch.optim.SGD semantics, no dampening, no Nesterov)
    weight_decay: float = 5e-4  # L2 coefficient added to the gradient
    batch_size: int = 256  # training images per step (the last batch of an epoch may be smaller)
    test_batch_size: int = 1024  # test images per forward pass (memory only; no effect on results)
    num_models: int = 5  # K independently initialised networks
    seed: int = 0  # root of every model's init / batch-order / augmentation generator, >= 0
    # Train the K models at once with vmap (True) or one after another (False); None = vmap on
    # CUDA, loop on CPU, where vmap ran at 0.4x the loop's speed (grouped convolutions and the
    # batched GroupNorm rule are slow there; experiments/bench_eval_vmap.py). Models with
    # buffers (BatchNorm) always use the loop.
    use_vmap: bool | None = None
    device: str = "cpu"  # where training runs; the images' dtype is kept
    keep_params: bool = False  # return the trained (K, ...) parameters in the result
    progress: bool = True  # tqdm bar over epochs

    def __post_init__(self) -> None:
        # A learned beta arrives as a 0-d tensor; store a plain float so the config is JSON-able.
        lr = self.lr.detach() if isinstance(self.lr, torch.Tensor) else self.lr
        object.__setattr__(self, "lr", float(lr))
        object.__setattr__(self, "arch_kwargs", dict(self.arch_kwargs))
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"EvalConfig.lr must be a positive finite number, got {self.lr}")
        check_int(self, "epochs", "batch_size", "test_batch_size", "num_models")
        check_choices(self)
        check_int(self, "seed", low=0)
        if self.lr_decay_epoch is not None and self.lr_decay_epoch < 0:
            raise ValueError(f"EvalConfig.lr_decay_epoch must be >= 0, got {self.lr_decay_epoch}")
        for name in ("lr_decay_factor", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"EvalConfig.{name} must be finite and >= 0, got {value}")

    def lr_at(self, epoch: int) -> float:
        """The step size used throughout ``epoch`` (0-based)."""
        decay = self.epochs // 2 if self.lr_decay_epoch is None else self.lr_decay_epoch
        return self.lr * self.lr_decay_factor if epoch >= decay else self.lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EvalResult:
    """Test (and validation) accuracies of the K trained models (fractions in [0, 1])."""

    accuracies: tuple[float, ...]  # (K,) test accuracy of model k
    config: EvalConfig
    engine: str  # 'vmap' or 'loop': which engine trained the models
    train_size: int  # N, training images
    seconds: float  # wall time of training and testing all K models
    final_params: Params | None = None  # name -> (K, ...) trained weights if config.keep_params
    # (K,) accuracy of model k on the validation split, when one was given: what choices use
    val_accuracies: tuple[float, ...] | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        """Population std (ddof 0) over the K models, as the field reports it (np.std)."""
        return float(np.std(self.accuracies))

    @property
    def val_mean(self) -> float:
        """Mean validation accuracy (NaN without a validation split)."""
        return float(np.mean(self.val_accuracies)) if self.val_accuracies else math.nan

    @property
    def val_std(self) -> float:
        return float(np.std(self.val_accuracies)) if self.val_accuracies else math.nan

    def scalars(self) -> dict[str, float]:
        """Mean and std of the test and validation accuracy by name (NaN without a validation
        split), as loggers take them."""
        return {"test_accuracy": self.mean, "test_accuracy_std": self.std,
                "val_accuracy": self.val_mean, "val_accuracy_std": self.val_std}

    def __str__(self) -> str:
        return (
            f"{100 * self.mean:.2f} +- {100 * self.std:.2f} % over {len(self.accuracies)} "
            f"{self.config.arch} models ({self.engine}, {self.seconds:.1f} s)"
        )

    def to_xarray(self, **labels: Any):
        """An xarray Dataset with ``accuracy`` over dim ``model``; each keyword becomes a length-1
        dim with that coordinate (``to_xarray(method="tesla", ipc=10)``) so results from several
        runs combine with ``xr.concat`` / ``xr.combine_by_coords``."""
        # where used: xarray and pandas cost 0.6 s at start-up, which the CLI's config flags
        # (EvalConfig, imported from here) would pay on every `tesla-func --help`
        from tesla_func.results import make_results

        ds = make_results(
            {"accuracy": (("model",), np.asarray(self.accuracies), {"units": "fraction"})},
            coords={"model": np.arange(len(self.accuracies))},
            config=self.config,
            seed=self.config.seed,
            device=self.config.device,
            engine=self.engine,
            train_size=self.train_size,
            seconds=self.seconds,
            accuracy_mean=self.mean,
            accuracy_std=self.std,
        )
        if self.val_accuracies is not None:
            ds["val_accuracy"] = (("model",), np.asarray(self.val_accuracies),
                                  {"units": "fraction"})
        for name, value in reversed(list(labels.items())):
            ds = ds.expand_dims({name: [value]})
        return ds


# ----------------------------------------------------------------------------------------------
# Inputs


def _check_sets(
    images: Tensor,
    labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    num_classes: int | None,
) -> int:
    """Validate the shapes, dtypes and label ranges; return the number of classes."""
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
        )
    n = images.shape[0]
    if n == 0:
        raise ValueError("the training set is empty")
    if test_images.dim() != 4 or test_images.shape[0] == 0:
        raise ValueError(
            f"test_images must be a non-empty (M, C, H, W) tensor, got {tuple(test_images.shape)}"
        )
    if test_images.shape[1:] != images.shape[1:]:
        raise ValueError(
            f"test images have shape (C, H, W) = {tuple(test_images.shape[1:])} but the model is "
            f"built for the training images' {tuple(images.shape[1:])}"
        )
    if test_labels.shape != test_images.shape[:1] or test_labels.is_floating_point():
        raise ValueError(
            f"test_labels must be (M,) = ({test_images.shape[0]},) int class indices, "
            f"got {test_labels.dtype} {tuple(test_labels.shape)}"
        )
    if labels.shape[:1] != (n,) or labels.dim() not in (1, 2):
        raise ValueError(f"labels must be (N,) or (N, K) with N = {n}, got {tuple(labels.shape)}")
    if labels.dim() == 2:
        if not labels.is_floating_point():
            raise ValueError(f"soft labels (N, K) must be float probabilities, got {labels.dtype}")
        if num_classes is not None and labels.shape[1] != num_classes:
            raise ValueError(
                f"soft labels have {labels.shape[1]} columns but num_classes is {num_classes}"
            )
        num_classes = labels.shape[1]
        sums = labels.sum(dim=1)
        if (
            not torch.isfinite(labels).all()
            or (labels < 0).any()
            or not torch.allclose(sums, torch.ones_like(sums), atol=_SOFT_LABEL_ATOL)
        ):
            raise ValueError(
                "soft labels must be probabilities (finite, >= 0, rows summing to 1); for learned "
                "label logits pass torch.softmax(logits, dim=1)"
            )
    elif labels.is_floating_point():
        raise ValueError(f"hard labels (N,) must be an integer dtype, got {labels.dtype}")
    if num_classes is None:
        num_classes = int(max(labels.max(), test_labels.max())) + 1
    for name, lab in (("labels", labels), ("test_labels", test_labels)):
        if lab.dim() == 1 and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
            raise ValueError(
                f"{name} must lie in [0, {num_classes}), got values in [{int(lab.min())}, {int(lab.max())}]"
            )
    return num_classes


_INIT, _ORDER, _AUGMENT = 0, 1, 2  # the three streams of a model


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


# ----------------------------------------------------------------------------------------------
# Engines: (skeleton, K initial param dicts, sets, config, augment) -> ((K,) test accuracies,
# name -> (K, ...) trained params). Both see validated, detached tensors on the target device.


class _Sets(NamedTuple):
    images: Tensor  # (N, C, H, W)
    labels: Tensor  # (N,) long or (N, classes) probabilities in the images' dtype
    # what the trained models are tested on: "test" (M, C, H, W) images with (M,) long labels,
    # and "val" when a validation split is given
    tested: dict[str, tuple[Tensor, Tensor]]


def accuracy(
    logits_of: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, batch_size: int = 1024
) -> Tensor:
    """Fraction of ``images`` (M, C, H, W) whose argmax logit is their label ``labels`` (M,).

    ``logits_of`` maps a batch (b, C, H, W) to logits (..., b, K): one network, or K networks at
    once under vmap, giving (K,) fractions. Runs without a graph, ``batch_size`` images at a time
    (memory only; the result does not depend on it). Put modules in eval mode first.
    """
    correct = 0
    with torch.no_grad():
        for part in _batches(images.shape[0], batch_size):
            correct = correct + (logits_of(images[part]).argmax(dim=-1) == labels[part]).sum(-1)
    return torch.as_tensor(correct, dtype=torch.float64) / images.shape[0]


def _train_vmap(
    skeleton: nn.Module,
    inits: list[Params],
    sets: _Sets,
    cfg: EvalConfig,
    augment: RandomAugment | None,
    ids: Sequence[int] | None = None,
) -> tuple[dict[str, list[float]], Params]:
    images, labels, tested = sets
    k_models, n = len(inits), images.shape[0]
    ids = range(k_models) if ids is None else ids  # the models' numbers k (their seeds)
    params = {name: torch.stack([p[name] for p in inits]) for name in inits[0]}  # name -> (K, ...)
    orders = [seeded_generator(cfg.seed, k, _ORDER) for k in ids]
    augs = [seeded_generator(cfg.seed, k, _AUGMENT) for k in ids]

    def loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
        """One model's batch loss: x (B, C, H, W), y (B,) or (B, classes)."""
        return F.cross_entropy(functional_call(skeleton, p, (x,), strict=True), y)

    grads_of = vmap(grad(loss))  # over (params (K, ...), x (K, B, ...), y (K, B, ...))
    optimizer = sgd(cfg.momentum, cfg.weight_decay)
    state = optimizer.init(params)
    for epoch in tqdm(
        range(cfg.epochs), desc=f"evaluate {cfg.arch} x{k_models} (vmap)", disable=not cfg.progress
    ):
        lr = cfg.lr_at(epoch)
        perms = torch.stack([torch.randperm(n, generator=g) for g in orders])  # (K, N)
        perms = perms.to(images.device)
        for part in _batches(n, cfg.batch_size):
            idx = perms[:, part]  # (K, B)
            x, y = images[idx], labels[idx]  # (K, B, C, H, W), (K, B) or (K, B, classes)
            if augment is not None:  # outside vmap: each model its own call, generator and family
                x = torch.stack([augment(x[k], augs[k]) for k in range(k_models)])
            params, state = optimizer.update(params, grads_of(params, x, y), state, lr)

    logits_of = vmap(
        lambda p, x: functional_call(skeleton, p, (x,), strict=True), in_dims=(0, None)
    )
    return {
        name: accuracy(lambda x: logits_of(params, x), x, y, cfg.test_batch_size).tolist()
        for name, (x, y) in tested.items()
    }, params


def _train_loop(
    skeleton: nn.Module,
    inits: list[Params],
    sets: _Sets,
    cfg: EvalConfig,
    augment: RandomAugment | None,
    ids: Sequence[int] | None = None,
) -> tuple[dict[str, list[float]], Params]:
    images, labels, tested = sets
    n, finals = images.shape[0], []
    ids = range(len(inits)) if ids is None else ids  # the models' numbers k (their seeds)
    accuracies: dict[str, list[float]] = {name: [] for name in tested}
    optimizer = sgd(cfg.momentum, cfg.weight_decay)
    bar = tqdm(
        total=cfg.epochs * len(inits),
        desc=f"evaluate {cfg.arch} x{len(inits)} (loop)",
        disable=not cfg.progress,
    )
    for k, init in zip(ids, inits):
        model = copy.deepcopy(skeleton)  # fresh buffers (BatchNorm running stats) for each model
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(init[name])
        state = optimizer.init(params)
        order = seeded_generator(cfg.seed, k, _ORDER)
        aug = seeded_generator(cfg.seed, k, _AUGMENT)
        model.train()
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=order).to(images.device)  # (N,)
            for part in _batches(n, cfg.batch_size):
                x, y = images[perm[part]], labels[perm[part]]
                if augment is not None:
                    x = augment(x, aug)
                for p in params.values():
                    p.grad = None
                F.cross_entropy(model(x), y).backward()
                with torch.no_grad():
                    stepped, state = optimizer.update(
                        {name: p.detach() for name, p in params.items()},
                        {name: p.grad for name, p in params.items()},
                        state,
                        cfg.lr_at(epoch),
                    )
                    for name, p in params.items():
                        p.copy_(stepped[name])
            bar.update(1)
        model.eval()
        for name, (x, y) in tested.items():
            accuracies[name].append(float(accuracy(model, x, y, cfg.test_batch_size)))
        finals.append({name: p.detach().clone() for name, p in params.items()})
    bar.close()
    return accuracies, {name: torch.stack([f[name] for f in finals]) for name in finals[0]}


def evaluate(
    images: Tensor,
    labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    config: EvalConfig = EvalConfig(),
    augment: RandomAugment | None = None,
    *,
    num_classes: int | None = None,
    val_images: Tensor | None = None,
    val_labels: Tensor | None = None,
    group: object | None = None,
    logger: RunLogger | None = None,
) -> EvalResult:
    """Train ``config.num_models`` fresh networks on (images, labels); test them on the test set
    (and on the validation split, if given: choices are made on it, never on the test set).

    images:      (N, C, H, W) float training images (a distilled set or real images); its dtype
                 is the training dtype
    labels:      (N,) int class indices, or (N, classes) float probabilities (soft targets;
                 pass softmax(logits) for learned label logits)
    test_images: (M, C, H, W) real test images, same (C, H, W) as ``images``
    test_labels: (M,) int class indices
    augment:     ``(x (B, C, H, W), generator) -> (B, C, H, W)``, called on every training batch
                 with the model's own CPU generator (DSA: pass ``tesla_func.augment.DSA()``); None = none
    num_classes: defaults to the soft labels' width, else max label + 1 over both sets
    val_images, val_labels: (V, C, H, W) and (V,) the validation split; ``val_accuracies``
    group:       None, or a ``torch.distributed`` process group whose ranks share the K models
                 (every rank calls with the same arguments): model k trains on rank k % W and
                 every rank returns all K accuracies (and ``final_params``); ``seconds`` is the
                 slowest rank's. Bad or differing arguments raise on every rank before training.
    logger:      where the test (and validation) accuracy, mean and std, also go, at step
                 ``config.epochs`` (:mod:`tesla_func.tracking`; rank 0 only); None: nowhere

    The architecture is ``config.arch`` built for (C, num_classes, H) with ``config.arch_kwargs``;
    H must equal W. Returns the K test accuracies (fractions) with their mean and std.
    """
    cfg = config
    sets_given = (images, labels, test_images, test_labels, num_classes, val_images, val_labels)
    models = range(cfg.num_models)
    if group is not None:  # model k trains on rank k % W
        models = _validate_and_spread(group, cfg, augment, *sets_given)
    num_classes, has_val = _validate(*sets_given)
    device, dtype = check_device(cfg.device), images.dtype
    # Skeleton and initial weights are made on the CPU from the model's own generator, so a
    # model's init does not depend on the device (or touch the CUDA RNG), then moved.
    skeleton = build_model(
        cfg.arch, images.shape[1], num_classes, images.shape[2], **cfg.arch_kwargs
    )
    skeleton = skeleton.to(dtype=dtype)
    inits = [
        {
            k: v.to(device)
            for k, v in init_params(skeleton, seeded_generator(cfg.seed, k, _INIT)).items()
        }
        for k in models
    ]
    skeleton = skeleton.to(device)
    tested = {"test": (test_images, test_labels), **({"val": (val_images, val_labels)}
                                                       if has_val else {})}
    sets = _Sets(
        images.detach().to(device),
        labels.detach().to(device, dtype if labels.dim() == 2 else torch.long),  # soft / hard
        {name: (x.detach().to(device, dtype), y.detach().to(device).long())
         for name, (x, y) in tested.items()},
    )

    has_buffers = any(True for _ in skeleton.buffers())
    use_vmap = device.type == "cuda" if cfg.use_vmap is None else cfg.use_vmap
    engine = "vmap" if use_vmap and not has_buffers else "loop"
    train = _train_vmap if engine == "vmap" else _train_loop
    start = time.perf_counter()
    if group is None:
        accuracies, final = train(skeleton, inits, sets, cfg, augment)
        seconds = time.perf_counter() - start
    else:
        rank = distributed.check_group(group)[0]
        quiet = cfg if rank == 0 else dataclasses.replace(cfg, progress=False)  # bars: rank 0
        accuracies, final = (
            train(skeleton, inits, sets, quiet, augment, models) if inits
            else ({name: [] for name in tested}, {})  # more ranks than models
        )
        accuracies, final = _sum_over_ranks(group, models, accuracies, final, skeleton, cfg)
        seconds = distributed.max_float(group, time.perf_counter() - start)
    result = EvalResult(
        accuracies=tuple(accuracies["test"]),
        val_accuracies=tuple(accuracies["val"]) if has_val else None,
        config=cfg,
        engine=engine,
        train_size=sets.images.shape[0],
        seconds=seconds,
        final_params={k: v.cpu() for k, v in final.items()} if cfg.keep_params else None,
    )
    if logger is not None and (group is None or distributed.check_group(group)[0] == 0):
        logger.scalars("evaluate", cfg.epochs, result.scalars())
    return result


def _validate(images, labels, test_images, test_labels, num_classes, val_images, val_labels,
              ) -> tuple[int, bool]:
    """The checks of :func:`evaluate`'s sets: (number of classes, whether a validation split is
    given)."""
    num_classes = _check_sets(images, labels, test_images, test_labels, num_classes)
    has_val = val_images is not None and len(val_images) > 0
    if has_val:
        _check_sets(images, labels, val_images, val_labels, num_classes)
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be square, got (H, W) = {tuple(images.shape[2:])}")
    return num_classes, has_val


def _validate_and_spread(group: object, cfg: EvalConfig, augment: object,
                         *sets: Tensor | int | None) -> list[int]:
    """Every rank validates the arguments; all raise together, also when the ranks' arguments
    differ. Returns the models k this rank trains (k % W == rank)."""
    names = ("images", "labels", "test images", "test labels", "num_classes",
             "validation images", "validation labels")

    def fingerprint() -> dict[str, str]:
        shared = {k: v for k, v in cfg.to_dict().items() if k != "progress"}  # bars: rank 0
        return {
            "the config": repr(shared), "the augmentation": type(augment).__name__,
            **{f"the {name}": distributed.checksum(value.double())
               if isinstance(value, Tensor) else repr(value) for name, value in zip(names, sets)},
        }

    distributed.check_group(group)
    with distributed.together(group, fingerprint):
        _validate(*sets)
        distributed.check_backend(group, torch.device(cfg.device))
    return distributed.spread(cfg.num_models, group)


def _sum_over_ranks(
    group: object,
    models: Sequence[int],
    accuracies: dict[str, list[float]],
    final: Params,
    skeleton: nn.Module,
    cfg: EvalConfig,
) -> tuple[dict[str, list[float]], Params]:
    """All K models' accuracies (and trained weights, with ``keep_params``) on every rank: each
    rank fills its models' entries of zero arrays, which one all-reduce sums (x + 0 = x: exact)."""
    k_models, names = cfg.num_models, list(accuracies)
    table = [[0.0] * k_models for _ in names]
    for row, name in zip(table, names):
        for k, value in zip(models, accuracies[name]):
            row[k] = value
    summed = distributed.sum_floats(group, [v for row in table for v in row])
    accuracies = {name: summed[i * k_models:(i + 1) * k_models] for i, name in enumerate(names)}
    if not cfg.keep_params:
        return accuracies, final
    stacked = {}
    for name, p in skeleton.named_parameters():
        stacked[name] = torch.zeros((k_models, *p.shape), dtype=p.dtype, device=p.device)
        for j, k in enumerate(models):
            stacked[name][k] = final[name][j]
    (whole,) = distributed.sum_over_ranks(group, stacked)
    return accuracies, whole


# A whole real training set converges in far fewer epochs than a 10-image set, and 1000 epochs of
# 60k images are 235k steps per model: the whole-set reference runs shorter by default.
WHOLE_SET_CONFIG = EvalConfig(epochs=50, lr=0.01)


def evaluate_whole_set(
    images: Tensor,
    labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    config: EvalConfig = WHOLE_SET_CONFIG,
    augment: RandomAugment | None = None,
    *,
    num_classes: int | None = None,
) -> EvalResult:
    """The 'whole set' upper bound: :func:`evaluate` on the entire real training set.

    Same protocol and arguments as :func:`evaluate`; only the default config differs
    (:data:`WHOLE_SET_CONFIG`: 50 epochs at lr 0.01). Cost: K * epochs * ceil(N / batch) steps,
    e.g. 5 * 50 * 235 = 59k ConvNet steps for Fashion-MNIST: hours on 2 CPU cores.
    """
    return evaluate(
        images, labels, test_images, test_labels, config, augment, num_classes=num_classes
    )

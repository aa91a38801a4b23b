"""Expert trajectories (MTT's "buffer"): train N networks on real data, keep every epoch's weights.

docs/reference.md section 3: SGD lr 0.01, momentum 0, weight decay 0, batch 256, DSA on every real
batch; the initial weights and the weights after every epoch are kept, with the test accuracy.
The number of experts and epochs, the lr and the ConvNet's width and depth default to the
dataset's (:meth:`ExpertConfig.resolved`, :mod:`tesla_func.data.defaults`). Weights that stop
being finite stop the training with an error that names the fix (a smaller lr); an expert under
twice chance accuracy after training is warned of (:func:`chance_warning`).

Each finished expert is one file, ``<out>/expert_007.safetensors`` (its format, and reading it
back checked: :mod:`tesla_func.expert_files`).

While an expert trains, each finished epoch is written atomically to
``<out>/expert_007.partial/epoch_003.safetensors`` together with the state needed to continue
(the shuffling and augmentation generators' states, SGD momentum buffers if any). A killed run
started again skips finished experts and continues a half-finished one after its last complete
epoch, giving bitwise the same weights as a run never interrupted (same device, same threads).

Several processes (``train_experts(..., group=...)``, or ``torchrun ... -m tesla_func.cli
experts``): expert i trains on rank i % W. An expert's randomness comes from (seed, i) only, so
it is bitwise the expert one process trains (same device and threads), and resuming works per
expert as in one process. The output folder must be one folder that every rank sees.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from tesla_func import distributed
from tesla_func.augment import DSA
from tesla_func.configargs import check_choices, check_int, choice
from tesla_func.configfile import CONFIG_TOML, write_config_toml
from tesla_func.data import (
    DATASETS,
    Dataset,
    DatasetInfo,
    dataset_options,
    depth_for,
    load_dataset,
    resolve,
    run_defaults,
)
from tesla_func.evaluate import accuracy
from tesla_func.expert_files import (  # noqa: F401 (load_expert(s), expert_path re-exported)
    FORMAT,
    FORMAT_VERSION,
    ExpertTrajectory,
    diff_fields,
    expert_path,
    load_expert,
    load_experts,
    param_key,
    read_header,
    skeleton,
)
from tesla_func.fileio import load_tensors, save_tensors
from tesla_func.models import ConvNetConfig, init_params
from tesla_func.optim import SGDState, sgd
from tesla_func.provenance import provenance
from tesla_func.runchecks import check_device, check_output_folder, warn
from tesla_func.sampling import seeded_generator
from tesla_func.tracking import RunLogger

STATELESS_NORMS = ("instance", "none")
CHANCE_FACTOR = 2.0  # an expert under this many times chance accuracy after training is warned of


@dataclass(frozen=True)
class ExpertConfig:
    """How experts are trained; saved in every expert file. A field left None takes the dataset's
    default when the dataset is loaded (:meth:`resolved`; the numbers:
    :mod:`tesla_func.data.defaults`), and the file records the resolved config and why."""

    dataset: str = choice("fashion-mnist", DATASETS)  # the dataset trained on
    zca: bool | None = None  # ZCA-whiten the data; None = the dataset's default
    num_experts: int | None = None  # N, trajectories trained (None: the dataset's default)
    epochs: int | None = None  # E; E + 1 checkpoints per expert (None: the dataset's default)
    # ConvNet feature maps (None: the dataset's default: 32 for digits and Fashion-MNIST on a
    # CPU, the field's 128 for the others)
    width: int | None = None
    # ConvNet blocks (None: from the image size: 3 up to 32 px, 4 at 64 px, 2 for 8x8 digits,
    # so that the last block's norm sees at least 4x4 values)
    depth: int | None = None
    # normalisation after each convolution; stateless ones only (no running statistics to save)
    norm: str = choice("instance", STATELESS_NORMS, why=(
        ": a trajectory is a list of parameters, and batch norm's running statistics are not "
        "parameters"))
    lr: float | None = None  # SGD learning rate (None: the dataset's default, 0.01 for all)
    momentum: float = 0.0  # SGD momentum of the experts (the field trains them without)
    weight_decay: float = 0.0  # L2 coefficient added to the experts' gradient (the field: 0)
    batch_size: int = 256  # real images per SGD step
    dsa: bool = True  # DSA on every real batch
    seed: int = 0  # base seed; expert i draws from streams of (seed, i)
    # "folder" only: resize every image to S x S pixels (bilinear); None: the images' own size,
    # one square size for all
    image_size: int | None = None

    def __post_init__(self) -> None:
        check_int(self, "num_experts", "epochs", "width", "depth", optional=True)
        check_int(self, "batch_size")
        check_choices(self)
        if self.image_size is not None:
            if "image_size" not in dataset_options(self.dataset):
                raise ValueError(
                    f"ExpertConfig.image_size is for your own images (dataset 'folder'); "
                    f"dataset {self.dataset!r} has a fixed size: leave image_size unset"
                )
            check_int(self, "image_size")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"ExpertConfig.lr must be finite and > 0, got {self.lr!r} "
                             "(--lr; 0.01 is the field's)")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"ExpertConfig.{name} must be finite and >= 0, got {value!r}")
        if self.momentum >= 1:
            raise ValueError(f"ExpertConfig.momentum must lie in [0, 1), got {self.momentum!r}")

    def resolved(self, info: DatasetInfo) -> tuple[ExpertConfig, dict[str, str]]:
        """This config with the dataset's defaults in its None fields, for the loaded dataset
        ``info``; and the record of what was chosen and why (:mod:`tesla_func.data.defaults`)."""
        defaults, why = run_defaults(self.dataset, info.channels, info.image_size)
        return resolve(self, {
            "num_experts": (defaults.num_experts, why),
            "epochs": (defaults.expert_epochs, why),
            "width": (defaults.width, why),
            "depth": depth_for(info.image_size),
            "lr": (defaults.expert_lr, why),
        })

    def to_dict(self) -> dict:
        return asdict(self)

    def model_config(self, dataset: Dataset) -> ConvNetConfig:
        """The experts' network for ``dataset`` (a resolved config: width and depth set)."""
        return dataset.info.convnet_config(width=self.width, depth=self.depth, norm=self.norm)


# ----------------------------------------------------------------------------------------------
# Paths and seeds
# ----------------------------------------------------------------------------------------------


def _partial_dir(out_dir: Path, index: int) -> Path:
    return out_dir / f"expert_{index:03d}.partial"


def _epoch_path(partial: Path, epoch: int) -> Path:
    return partial / f"epoch_{epoch:03d}.safetensors"


_STREAMS = {"init": 0, "shuffle": 1, "augment": 2}  # expert i draws from (seed, i, stream)


def _generator(seed: int, index: int, stream: str) -> torch.Generator:
    """Expert ``index``'s generator for one purpose; separate streams keep e.g. the shuffling
    order unchanged when DSA is switched off."""
    return seeded_generator(seed, index, _STREAMS[stream])


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

EpochCallback = Callable[[int, int, float], None]  # (expert index, epoch, test accuracy)


def _test_accuracy(model: torch.nn.Module, data: _Tensors) -> float:
    """Test accuracy of ``model`` in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return float(accuracy(model, data.test_x, data.test_y, batch_size=1000))
    finally:
        model.train(was_training)


def train_experts(
    cfg: ExpertConfig,
    out_dir: str | Path,
    *,
    dataset: Dataset | None = None,
    root: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
    group: object | None = None,
    wait_s: float = 1800.0,
    logger: RunLogger | None = None,
) -> list[Path]:
    """Train ``cfg.num_experts`` experts into ``out_dir``, resuming whatever a past run finished.

    Args:
        dataset: an already loaded dataset (must match ``cfg.dataset`` / ``cfg.zca``); else it is
            loaded with ``load_dataset(cfg.dataset, root, zca=cfg.zca)`` (and
            ``image_size=cfg.image_size`` for "folder").
        on_epoch: ``(expert index, epoch, test accuracy)``, called after each checkpoint is on
            disk (epoch 0 = the initial weights); an exception it raises stops the run there,
            which is how the tests simulate a kill.
        group: a ``torch.distributed`` process group whose ranks share the work (every rank
            calls with the same arguments and the same ``out_dir``, one folder they all see):
            expert i trains on rank i % W; progress bars come from rank 0.
        wait_s: with ``group``, how long a rank that has finished its experts waits for the
            others' while nothing under ``out_dir`` changes (each epoch writes a file), before
            it raises TimeoutError.
        logger: where each epoch's last-batch loss and test accuracy also go
            (:mod:`tesla_func.tracking`, under ``experts/expert_<i>/``; with ``group``, rank 0's
            experts only).

    The config is written to ``out_dir/config.toml`` (:mod:`tesla_func.configfile`) once the
    folder is known to hold nothing of another config. Returns the paths of the N expert files
    (with ``group``: once every rank has finished).
    Raises ValueError if ``out_dir`` holds experts or partial runs of another configuration
    (with ``group``: on every rank, before any training).
    """
    out = check_output_folder(out_dir)
    check_device(device)
    if group is None:  # the dataset first: a set-up that fails leaves no folder behind
        dataset = _dataset(cfg, dataset, root)
        cfg, chosen = cfg.resolved(dataset.info)
        cfg.model_config(dataset)  # raises for a network that does not fit the images: no folder
        _claim_folder(cfg, out, write=True)
        return _train_experts(cfg, chosen, out, dataset, device, progress, on_epoch, None, logger)
    rank, _ = distributed.check_group(group)
    with distributed.together(group, lambda: {"the expert config": repr(cfg.to_dict())}):
        dataset = _dataset(cfg, dataset, root)
        cfg, chosen = cfg.resolved(dataset.info)
        cfg.model_config(dataset)  # raises for a network that does not fit the images: no folder
        out.mkdir(parents=True, exist_ok=True)
        _claim_folder(cfg, out, write=rank == 0)  # every rank checks every file already there
    mine = distributed.spread(cfg.num_experts, group)
    _train_experts(cfg, chosen, out, dataset, device, progress and rank == 0, on_epoch, mine,
                   logger if rank == 0 else None)
    paths = [expert_path(out, i) for i in range(cfg.num_experts)]
    distributed.wait_for_files(paths, out, wait_s)
    distributed.barrier(group)
    return paths


def _dataset(cfg: ExpertConfig, dataset: Dataset | None, root: str | Path | None) -> Dataset:
    """The dataset given (checked against the config), or the config's, loaded."""
    if dataset is None:
        options = {"image_size": cfg.image_size} if cfg.image_size is not None else {}
        return load_dataset(cfg.dataset, root, zca=cfg.zca, **options)
    if dataset.info.name != cfg.dataset or (cfg.zca is not None and dataset.info.zca != cfg.zca):
        raise ValueError(
            f"dataset {dataset.info.name!r} (zca={dataset.info.zca}) does not match "
            f"the config's {cfg.dataset!r} (zca={cfg.zca})"
        )
    if cfg.image_size is not None and dataset.info.image_size != cfg.image_size:
        raise ValueError(
            f"dataset {dataset.info.name!r} has {dataset.info.image_size}-pixel images, but the "
            f"config asks for image_size {cfg.image_size}"
        )
    return dataset


def _claim_folder(cfg: ExpertConfig, out: Path, write: bool) -> None:
    """Refuse ``out`` if a file in it belongs to another config; then (``write``) write
    ``out/config.toml``."""
    for index in range(cfg.num_experts):
        _check_folder(cfg, out, index)
    if write:
        write_config_toml(out / CONFIG_TOML, cfg.to_dict(), comment=(
            "tesla_func ExpertConfig of these experts; they train again with\n"
            "tesla-func experts --config config.toml --out DIR (and --root, --device as before)"))


def _check_folder(cfg: ExpertConfig, out: Path, index: int) -> None:
    """Refuse expert ``index``'s files in ``out`` when another config made them."""
    if expert_path(out, index).exists():
        _check_same_config(read_header(expert_path(out, index)), cfg, expert_path(out, index))
    _last_saved_epoch(_partial_dir(out, index), cfg)


def _train_experts(
    cfg: ExpertConfig,
    chosen: dict[str, str],
    out: Path,
    dataset: Dataset,
    device: torch.device | str,
    progress: bool,
    on_epoch: EpochCallback | None,
    indices: Sequence[int] | None,
    logger: RunLogger | None = None,
) -> list[Path]:
    """Train (or resume) experts ``indices`` (None: all N) of the resolved ``cfg`` (``chosen``:
    the record of its defaults) into ``out``; their paths."""
    cfg.model_config(dataset)  # raises for a network that does not fit the images: no folder
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    data = _Tensors(
        train_x=dataset.train_images.to(device),
        train_y=dataset.train_labels.to(device),
        test_x=dataset.test_images.to(device),
        test_y=dataset.test_labels.to(device),
    )
    paths = []
    indices = range(cfg.num_experts) if indices is None else indices
    experts_bar = tqdm(indices, desc="experts", unit="expert", disable=not progress)
    for index in experts_bar:
        path = expert_path(out, index)
        if path.exists():
            _check_same_config(read_header(path), cfg, path)
            shutil.rmtree(_partial_dir(out, index), ignore_errors=True)  # killed after the rename
        else:
            _train_one(cfg, chosen, dataset, data, out, index, device, progress, on_epoch, logger)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class _Tensors:
    train_x: Tensor  # (N, C, H, W) on the training device
    train_y: Tensor  # (N,)
    test_x: Tensor
    test_y: Tensor


def _train_one(
    cfg: ExpertConfig,
    chosen: dict[str, str],
    dataset: Dataset,
    data: _Tensors,
    out: Path,
    index: int,
    device: torch.device,
    progress: bool,
    on_epoch: EpochCallback | None,
    logger: RunLogger | None = None,
) -> None:
    arch = cfg.model_config(dataset)
    tag = f"experts/expert_{index:03d}"
    model = skeleton(arch).to(device)
    params = dict(model.named_parameters())
    names = list(params)
    optimizer = sgd(cfg.momentum, cfg.weight_decay)
    state = optimizer.init(params)
    shuffle_gen = _generator(cfg.seed, index, "shuffle")
    augment_gen = _generator(cfg.seed, index, "augment")
    partial = _partial_dir(out, index)
    last = _last_saved_epoch(partial, cfg)
    if last >= 0:
        tensors, _ = load_tensors(_epoch_path(partial, last))
        _set_params(model, {n: tensors[f"params/{n}"] for n in names})
        shuffle_gen.set_state(tensors["rng/shuffle"])
        augment_gen.set_state(tensors["rng/augment"])
        state = SGDState({name: tensors[f"momentum/{name}"].to(device) for name in state.momentum})
    else:
        last = 0
        _set_params(model, init_params(model, _generator(cfg.seed, index, "init")))
        acc = _test_accuracy(model, data)
        _save_epoch(partial, 0, model, state, shuffle_gen, augment_gen, cfg, acc, 0.0)
        if logger is not None:
            logger.scalars(tag, 0, {"test_accuracy": acc})
        if on_epoch is not None:
            on_epoch(index, 0, acc)

    dsa = DSA() if cfg.dsa else None
    n = len(data.train_y)
    bar = tqdm(
        range(last + 1, cfg.epochs + 1),
        desc=f"expert {index}",
        unit="epoch",
        leave=False,
        disable=not progress,
        initial=last,
        total=cfg.epochs,
    )
    for epoch in bar:
        start = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=shuffle_gen).to(device)
        for first in range(0, n, cfg.batch_size):  # the last batch may be smaller, as MTT's
            batch = order[first : first + cfg.batch_size]
            x, y = data.train_x[batch], data.train_y[batch]
            if dsa is not None:
                x = dsa(x, augment_gen)
            for p in params.values():
                p.grad = None
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            with torch.no_grad():
                stepped, state = optimizer.update(
                    {name: p.detach() for name, p in params.items()},
                    {name: p.grad for name, p in params.items()},
                    state,
                    cfg.lr,
                )
                for name, p in params.items():
                    p.copy_(stepped[name])
        seconds = time.perf_counter() - start
        if not all(bool(torch.isfinite(p).all()) for p in params.values()):
            raise ValueError(
                f"expert {index} diverged in epoch {epoch}: its weights are no longer finite "
                f"(loss {loss.item():.3g}); train with a smaller --lr (now {cfg.lr:g}), in a new "
                f"--out folder or after deleting {partial}"
            )
        acc = _test_accuracy(model, data)
        _save_epoch(partial, epoch, model, state, shuffle_gen, augment_gen, cfg, acc, seconds)
        bar.set_postfix(loss=f"{loss.item():.3f}", test_acc=f"{acc:.4f}")
        if logger is not None:
            logger.scalars(tag, epoch, {"loss": loss.item(), "test_accuracy": acc})
        if on_epoch is not None:
            on_epoch(index, epoch, acc)
    bar.close()
    _finish(cfg, chosen, dataset, arch, out, index, names, device)


def _set_params(model: torch.nn.Module, params: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])


def _save_epoch(
    partial: Path,
    epoch: int,
    model: torch.nn.Module,
    state: SGDState,
    shuffle_gen: torch.Generator,
    augment_gen: torch.Generator,
    cfg: ExpertConfig,
    accuracy: float,
    seconds: float,
) -> None:
    """One epoch's weights plus everything needed to continue from it, written atomically."""
    tensors = {f"params/{n}": p for n, p in model.named_parameters()}
    tensors["rng/shuffle"] = shuffle_gen.get_state()
    tensors["rng/augment"] = augment_gen.get_state()
    tensors.update({f"momentum/{n}": buf for n, buf in state.momentum.items()})
    header = {
        "format": f"{FORMAT}.partial",
        "expert_config": cfg.to_dict(),
        "epoch": epoch,
        "accuracy": accuracy,
        "seconds": seconds,
    }
    save_tensors(_epoch_path(partial, epoch), tensors, header)


def _last_saved_epoch(partial: Path, cfg: ExpertConfig) -> int:
    """k where epochs 0..k are all saved in ``partial`` (-1 if none), checking their config."""
    epoch = 0
    while epoch <= cfg.epochs and (path := _epoch_path(partial, epoch)).is_file():
        _check_same_config(read_header(path), cfg, path)
        epoch += 1
    return epoch - 1


def _finish(
    cfg: ExpertConfig,
    chosen: dict[str, str],
    dataset: Dataset,
    arch: ConvNetConfig,
    out: Path,
    index: int,
    names: Sequence[str],
    device: torch.device,
) -> None:
    """Gather the epoch checkpoints into the expert file (atomic), then drop them."""
    partial = _partial_dir(out, index)
    tensors: dict[str, Tensor] = {}
    accuracy, seconds = [], []
    for epoch in range(cfg.epochs + 1):
        saved, header = load_tensors(_epoch_path(partial, epoch))
        tensors.update({param_key(epoch, n): saved[f"params/{n}"] for n in names})
        accuracy.append(header["accuracy"])
        if epoch > 0:
            seconds.append(header["seconds"])
    info = dataset.info.to_dict()  # class names and source included: distill checks them
    record: dict[str, str] = {}
    at_chance = chance_warning(f"expert {index}", accuracy[-1], cfg.epochs,
                               dataset.info.num_classes)
    if at_chance:
        warn("chance", at_chance, record)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": arch.to_dict(),
        "dataset": dataset.info.name,
        "dataset_info": info,
        "expert_config": cfg.to_dict(),
        "expert_index": index,
        "seed": cfg.seed,
        "lr": cfg.lr,
        "epochs": cfg.epochs,
        "test_accuracy": accuracy,
        "seconds_per_epoch": seconds,
        "provenance": provenance(device),
        "defaults": chosen,  # the fields the dataset's defaults set, and why
        "warnings": list(record.values()),
    }
    save_tensors(expert_path(out, index), tensors, header)
    shutil.rmtree(partial)


def chance_warning(what: str, accuracy: float, epochs: int, num_classes: int) -> str | None:
    """The warning for an expert whose final test ``accuracy`` is under twice chance (1 / K),
    naming the fixes; None for one that learned."""
    if accuracy >= CHANCE_FACTOR / num_classes:
        return None
    return (f"{what} reached only {accuracy:.1%} test accuracy after {epochs} epochs (chance: "
            f"{1 / num_classes:.1%}): a synthetic set cannot learn from it; train longer "
            "(--epochs), with another --lr, or a shallower network (--depth)")


# ----------------------------------------------------------------------------------------------
# Headers and config checks
# ----------------------------------------------------------------------------------------------


def _check_same_config(header: Mapping[str, Any], cfg: ExpertConfig, path: Path) -> None:
    """A resumed run must continue with the settings that made the files already there."""
    # num_experts may grow between runs: training more experts into the same folder is fine.
    found = {k: v for k, v in header.get("expert_config", {}).items() if k != "num_experts"}
    wanted = {k: v for k, v in cfg.to_dict().items() if k != "num_experts"}
    problems = diff_fields(found, wanted)
    if problems:
        raise ValueError(
            f"{path} was made with another expert config ({'; '.join(problems)}); "
            "use another output folder or delete it"
        )

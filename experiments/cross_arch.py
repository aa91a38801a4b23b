"""The transfer table: sets distilled with ConvNet, trained on the field's other architectures.

    python experiments/cross_arch.py                  # CPU default: standard networks, short runs
    python experiments/cross_arch.py --preset paper   # 1000 epochs, 5 models, GPU
    python experiments/cross_arch.py --archs convnet vit --lr-grid 0.001 0.01

Distils (or reuses, from ./cache) `tesla` sets with ConvNet experts, then trains fresh networks
of each architecture on them and on a random real subset of the same size, all in one protocol
(docs/reference.md section 6): SGD momentum 0.9, weight decay 5e-4, DSA on every batch, lr x 0.1
at half the epochs. The architectures are the field's standard sizes: ResNet-18 at width 64 with
batch norm (the field's ResNet-18) and with instance norm, and the ViT of DC-bench (patch 4, dim
512, depth 6, 8 heads, MLP 512; no dropout here), on 28x28 inputs.

Each network is trained twice over: with the set's own lr (a distilled set's learned beta, 0.01
for random real), as MTT's transfer table does, and with the lr of ``lr_grid`` (or the set's own)
that reaches the best accuracy on the validation split, a held-out part of the training set. The
test set chooses nothing: it gives the number at the chosen lr. Writes
results/cross_arch/cross_arch.{nc,png,md} and cross_arch_sets.png (the
distilled sets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from tesla_func.augment import DSA
from tesla_func.data import Dataset, load_dataset
from tesla_func.distill import DistillConfig
from tesla_func.evaluate import EvalConfig, evaluate
from tesla_func.experiment import distill_cached, distill_run, ensure_experts, run_experiment
from tesla_func.experts import ExpertConfig
from tesla_func.plots import plot_bar, plot_experiment_sets
from tesla_func.results import make_results, markdown_table, percent
from tesla_func.sampling import per_class_indices, seeded_generator

NAME = "cross_arch"

# name -> (architecture of tesla_func.models.ARCHITECTURES, its arguments); "convnet" is the
# experts' own (its width is the experts')
ARCHS = {
    "convnet": ("convnet", {}),
    "convnetd4": ("convnetd4", {}),
    "resnet18_bn": ("resnet18", {"width": 64, "norm": "batch"}),
    "resnet18_in": ("resnet18", {"width": 64, "norm": "instance"}),
    "vit": ("vit", {"patch_size": 4, "dim": 512, "depth": 6, "heads": 8, "mlp_dim": 512}),
}


@dataclass(frozen=True)
class CrossArchConfig:
    # experts and the distillation runs: main_table's (the same configs, so its IPC 10 runs are
    # reused from the cache, not made again). The older settings without lr_grad_clip (80
    # iterations of T = 20, lr_img 300) let beta collapse to 3e-4 on this split's experts.
    experts: ExpertConfig = ExpertConfig(dataset="fashion-mnist", num_experts=3, epochs=6, width=32)
    distill: DistillConfig = DistillConfig(
        iterations=50,
        syn_steps=60,
        match_epochs=2,
        max_start_epoch=4,
        lr_img=1000.0,
        lr_lr=1.0,
        eval_every=50,
        eval_epochs=200,
        eval_models=3,
    )
    ipc: int = 10
    sets: tuple[str, ...] = ("tesla/hard",)  # method/label strategy distilled with ConvNet
    archs: tuple[str, ...] = ("convnet", "resnet18_bn", "resnet18_in", "vit")  # keys of ARCHS
    # lrs tried besides the set's own; the one with the best validation accuracy is reported.
    # Two on the CPU default, so that it runs in about an hour (the paper preset tries three)
    lr_grid: tuple[float, ...] = (0.01, 0.1)
    # training epochs of every transfer network (the paper: 1000; ResNet-18 and the ViT take
    # about 3 s a step of 100 images on 2 CPU cores, and IPC 10 is one step an epoch)
    epochs: int = 50
    models: int = 1  # networks trained per (set, architecture, lr)
    val_images: int = 1000  # validation images the lr is chosen on (a fixed subset)
    batch_syn_max: int = 20  # batch_syn = min(ipc * classes, this)
    threads: int = 0  # torch CPU threads on the command-line path; 0 = torch's default

    def __post_init__(self) -> None:
        unknown = [a for a in self.archs if a not in ARCHS]
        if unknown:
            raise ValueError(f"unknown architectures {unknown}; known: {sorted(ARCHS)}")


PRESETS = {
    "paper": CrossArchConfig(
        experts=ExpertConfig(dataset="fashion-mnist", num_experts=20, epochs=50, width=128),
        distill=dataclasses.replace(
            CrossArchConfig.distill,
            iterations=5000,
            syn_steps=30,
            max_start_epoch=20,
            eval_epochs=1000,
            eval_models=5,
            device="cuda",
        ),
        sets=("tesla/hard", "tesla/sla", "exact/hard"),
        lr_grid=(0.001, 0.01, 0.1),
        epochs=1000,
        models=5,
        val_images=5000,
        batch_syn_max=500,
    ),
}


def _training_sets(cfg: CrossArchConfig, dataset: Dataset) -> tuple[dict[str, tuple],
                                                                      dict[str, str]]:
    """name -> (images, labels, the set's own lr): random real, then each distilled set; and
    panel title -> the distilled set's file (the sets figure)."""
    base = cfg.distill
    experts_dir = ensure_experts(cfg.experts, device=base.device)
    index = per_class_indices(dataset.train_labels, cfg.ipc,
                              torch.Generator().manual_seed(base.seed),
                              dataset.info.num_classes)
    sets = {"random/real": (dataset.train_images[index], dataset.train_labels[index], 0.01)}
    files = {}
    for name in cfg.sets:
        method, strategy = name.split("/")
        run = distill_run(base, experts_dir, ipc=cfg.ipc, batch_syn_max=cfg.batch_syn_max,
                          num_classes=dataset.info.num_classes, method=method,
                          label_strategy=strategy)
        distiller = distill_cached(run, dataset)
        synthetic = distiller.synthetic_set()
        sets[name] = (synthetic.images, synthetic.labels, synthetic.lr)
        files[f"{name}, IPC {cfg.ipc}"] = str(distiller.out / "synthetic.safetensors")
    return sets, files


def main(cfg: CrossArchConfig) -> xr.Dataset:
    base = cfg.distill
    dataset = load_dataset(cfg.experts.dataset)
    sets, files = _training_sets(cfg, dataset)
    # a fixed subset of the validation split: what the lr is chosen on
    val = per_class_indices(dataset.val_labels, cfg.val_images // dataset.info.num_classes,
                            seeded_generator(base.seed, 1), dataset.info.num_classes)
    choices = ("own", *(f"grid {lr:g}" for lr in cfg.lr_grid))
    shape = (len(sets), len(cfg.archs), len(choices), cfg.models)
    test, valid = np.full(shape, np.nan), np.full(shape, np.nan)
    lrs = np.full(shape[:3], np.nan)
    bar = tqdm(total=int(np.prod(shape[:3])), desc="transfer", unit="training")
    for i, (name, (images, labels, own_lr)) in enumerate(sets.items()):
        for j, arch in enumerate(cfg.archs):
            model, kwargs = ARCHS[arch]
            if arch == "convnet":
                kwargs = {"width": cfg.experts.width}
            trained = {}  # lr -> result: an lr of the grid equal to the set's own is trained once
            for c, lr in enumerate((own_lr, *cfg.lr_grid)):
                if lr not in trained:
                    protocol = EvalConfig(arch=model, arch_kwargs=kwargs, epochs=cfg.epochs,
                                          lr=lr, num_models=cfg.models, seed=base.seed,
                                          device=base.device, progress=False)
                    trained[lr] = evaluate(images, labels, dataset.test_images,
                                           dataset.test_labels, protocol, DSA(),
                                           num_classes=dataset.info.num_classes,
                                           val_images=dataset.val_images[val],
                                           val_labels=dataset.val_labels[val])
                    tqdm.write(f"{name:>12} on {arch:>11} at lr {lr:.4g}: validation "
                               f"{100 * trained[lr].val_mean:.1f} %, test {trained[lr]}")
                result = trained[lr]
                test[i, j, c], valid[i, j, c], lrs[i, j, c] = (
                    result.accuracies, result.val_accuracies, lr)
                bar.update(1)
    bar.close()
    chosen = np.nanmean(valid, axis=-1).argmax(axis=-1)  # (set, arch): best validation mean
    at_chosen = np.take_along_axis(test, chosen[..., None, None], axis=2)[:, :, 0]
    dims = ("set", "arch", "lr_choice", "model")
    fraction = {"units": "fraction"}
    return make_results(
        {
            "accuracy": (dims, test, {**fraction, "long_name": "test accuracy"}),
            "val_accuracy": (dims, valid, {**fraction, "long_name": "validation accuracy"}),
            "lr": (dims[:3], lrs, {"long_name": "training lr"}),
            "chosen": (("set", "arch"), np.asarray(choices)[chosen],
                       {"long_name": "lr choice with the best validation accuracy"}),
            "chosen_accuracy": (("set", "arch", "model"), at_chosen, {
                **fraction, "long_name": "test accuracy at the lr chosen on validation"}),
        },
        coords={"set": list(sets), "arch": list(cfg.archs), "lr_choice": list(choices),
                "model": np.arange(cfg.models)},
        config=cfg,
        seed=base.seed,
        device=base.device,
        synthetic_sets=files,
        protocol="paper" if cfg == PRESETS["paper"] else "reduced",
    )


def table(ds: xr.Dataset) -> str:
    """Markdown: per set, each architecture's test accuracy at the lr chosen on validation
    (that lr), then at the set's own lr."""
    header = ["training set (ConvNet-distilled)", "lr"] + [str(a) for a in ds.arch.values]
    rows = []
    for name in ds.set.values:
        chosen_row, own_row = [str(name).replace("/", " / "), "chosen on validation"], [
            "", "the set's own"]
        for arch in ds.arch.values:
            at = ds.sel(set=name, arch=arch)
            choice = str(at.chosen.values)
            acc = at.accuracy.sel(lr_choice=choice).values
            chosen_row.append(f"{percent(float(np.mean(acc)), float(np.std(acc)))} "
                              f"(lr {float(at.lr.sel(lr_choice=choice)):.3g})")
            own = at.accuracy.sel(lr_choice="own").values
            own_row.append(f"{percent(float(np.mean(own)), float(np.std(own)))} "
                           f"(lr {float(at.lr.sel(lr_choice='own')):.3g})")
        rows += [chosen_row, own_row]
    return markdown_table(header, rows)


if __name__ == "__main__":
    run_experiment(
        NAME,
        CrossArchConfig,
        PRESETS,
        __doc__,
        main,
        table,
        notes="Test accuracy (%), mean +- std over the networks trained, at the lr with the best "
        "validation accuracy (from the grid and the set's own), and at the set's own lr (a "
        "distilled set's learned beta; 0.01 for random real).",
        plot=lambda nc, png: plot_bar(
            nc, png, var="chosen_accuracy", x="arch", hue="set", replicate=("model",),
            title="Cross-architecture transfer (lr chosen on validation)"
        ),
        sets=plot_experiment_sets,
    )

"""The transfer table: sets distilled with ConvNet, trained on the field's other architectures.

    python experiments/cross_arch.py                  # CPU default: standard networks, short runs
    python experiments/cross_arch.py --preset paper   # 1000 epochs, 5 models, GPU
    python experiments/cross_arch.py --archs convnet vit --lr-grid 0.001 0.01 --ipcs 10

Distils (or reuses, from ./cache: main_table's seed-0 runs) `tesla` sets with ConvNet experts at
every IPC of ``ipcs``, then trains ``models`` fresh networks (different initialisations) of each
architecture on them and on a random real subset of the same size, all in one protocol
(docs/reference.md section 6): SGD momentum 0.9, weight decay 5e-4, DSA on every batch, lr x 0.1
at half the epochs. The architectures are the field's standard sizes: ResNet-18 at width 64 with
batch norm (the field's ResNet-18) and with instance norm, and the ViT of DC-bench (patch 4, dim
512, depth 6, 8 heads, MLP 512; no dropout here), on 28x28 inputs. Each cell is mean +- std over
its networks (sample std, ddof 1).

Each network is trained with the set's own lr (a distilled set's learned beta, 0.01 for random
real), as MTT's transfer table does, and, when ``lr_grid`` is not empty, also with each lr of the
grid; the lr (of the grid or the set's own) with the best mean accuracy on the validation split,
a held-out part of the training set, is then reported beside the own lr's. The test set chooses
nothing.

Cost on the 2-core CPU, one thread (measured with another job on the other core): a ResNet-18
trains 50 epochs on 100 images (IPC 10) in about 2.2 min and on 10 in 15 s, the ViT in 3.9 min
and 30 s; testing one on 10,000 images takes 2.5-3.5 min. So the CPU default tests every
network on a fixed class-balanced subset of ``test_images`` = 2000 test images (the same for
every network; 1.0 point of binomial standard error at 80%) and trains with the set's own lr
only (an empty ``lr_grid``: each lr tried would cost as much again): 2 sets x 2 IPCs x 4
architectures x 3 networks, about 75 min besides the two distillation runs (reused when
main_table ran first).

Writes results/cross_arch/cross_arch.{nc,png,md} and cross_arch_sets.png (the distilled sets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import seaborn as sns
import torch
import xarray as xr
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from tesla_func.augment import DSA
from tesla_func.data import Dataset, load_dataset
from tesla_func.distill import DistillConfig
from tesla_func.evaluate import EvalConfig, evaluate
from tesla_func.experiment import distill_cached, distill_run, ensure_experts, run_experiment
from tesla_func.experts import ExpertConfig
from tesla_func.plots import plot_experiment_sets, save_png
from tesla_func.plots.style import STYLE
from tesla_func.results import load_results, make_results, markdown_table, spread
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
        lr_grad_clip=0.5,
        eval_every=50,
        eval_epochs=200,
        eval_models=3,
    )
    ipcs: tuple[int, ...] = (1, 10)  # images per class, side by side in the table
    sets: tuple[str, ...] = ("tesla/hard",)  # method/label strategy distilled with ConvNet
    archs: tuple[str, ...] = ("convnet", "resnet18_bn", "resnet18_in", "vit")  # keys of ARCHS
    # lrs tried besides the set's own; the one with the best validation accuracy is reported
    # beside the own lr's. Empty on the CPU default: each lr costs as much as the own lr again
    lr_grid: tuple[float, ...] = ()
    # training epochs of every transfer network (the paper: 1000; ResNet-18 and the ViT take
    # about 3 s a step of 100 images on 2 CPU cores, and IPC 10 is one step an epoch)
    epochs: int = 50
    models: int = 3  # networks trained per (set, IPC, architecture, lr), init seeds 0 .. n-1
    val_images: int = 1000  # validation images the lr is chosen on (a fixed subset; grid only)
    # test images every network is tested on: a fixed class-balanced subset (0: the whole test
    # set); testing a ResNet-18 or the ViT on all 10,000 costs more than training it at IPC 10
    test_images: int = 2000
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
        test_images=0,
        batch_syn_max=500,
    ),
}


def _training_sets(cfg: CrossArchConfig, dataset: Dataset, ipc: int) -> tuple[
        dict[str, tuple], dict[str, str]]:
    """name -> (images, labels, the set's own lr) at ``ipc``: random real, then each distilled
    set; and panel title -> the distilled set's file (the sets figure)."""
    base = cfg.distill
    experts_dir = ensure_experts(cfg.experts, device=base.device)
    index = per_class_indices(dataset.train_labels, ipc,
                              torch.Generator().manual_seed(base.seed),
                              dataset.info.num_classes)
    sets = {"random/real": (dataset.train_images[index], dataset.train_labels[index], 0.01)}
    files = {}
    for name in cfg.sets:
        method, strategy = name.split("/")
        run = distill_run(base, experts_dir, ipc=ipc, batch_syn_max=cfg.batch_syn_max,
                          num_classes=dataset.info.num_classes, method=method,
                          label_strategy=strategy)
        distiller = distill_cached(run, dataset)
        synthetic = distiller.synthetic_set()
        sets[name] = (synthetic.images, synthetic.labels, synthetic.lr)
        files[f"{name}, IPC {ipc}"] = str(distiller.out / "synthetic.safetensors")
    return sets, files


def main(cfg: CrossArchConfig) -> xr.Dataset:
    base = cfg.distill
    dataset = load_dataset(cfg.experts.dataset)
    k = dataset.info.num_classes
    by_ipc, files = {}, {}
    for ipc in cfg.ipcs:
        by_ipc[ipc], more = _training_sets(cfg, dataset, ipc)
        files.update(more)
    names = list(by_ipc[cfg.ipcs[0]])
    # fixed subsets: the validation images the lr is chosen on, the test images every network
    # is tested on
    val = per_class_indices(dataset.val_labels, cfg.val_images // k, seeded_generator(base.seed, 1),
                            k)
    test = (per_class_indices(dataset.test_labels, cfg.test_images // k,
                              seeded_generator(base.seed, 2), k)
            if cfg.test_images else torch.arange(len(dataset.test_labels)))
    validate = {"val_images": dataset.val_images[val], "val_labels": dataset.val_labels[val]} \
        if cfg.lr_grid else {}
    choices = ("own", *(f"grid {lr:g}" for lr in cfg.lr_grid))
    shape = (len(names), len(cfg.ipcs), len(cfg.archs), len(choices), cfg.models)
    accuracy, valid = np.full(shape, np.nan), np.full(shape, np.nan)
    lrs = np.full(shape[:4], np.nan)
    bar = tqdm(total=int(np.prod(shape[:4])), desc="transfer", unit="training")
    for i, name in enumerate(names):
        for j, ipc in enumerate(cfg.ipcs):
            images, labels, own_lr = by_ipc[ipc][name]
            for a, arch in enumerate(cfg.archs):
                model, kwargs = ARCHS[arch]
                if arch == "convnet":
                    kwargs = {"width": cfg.experts.width}
                trained = {}  # lr -> result: a grid lr equal to the set's own is trained once
                for c, lr in enumerate((own_lr, *cfg.lr_grid)):
                    if lr not in trained:
                        protocol = EvalConfig(arch=model, arch_kwargs=kwargs, epochs=cfg.epochs,
                                              lr=lr, num_models=cfg.models, seed=base.seed,
                                              device=base.device, progress=False)
                        trained[lr] = evaluate(images, labels, dataset.test_images[test],
                                               dataset.test_labels[test], protocol, DSA(),
                                               num_classes=k, **validate)
                        tqdm.write(f"{name:>12}, IPC {ipc:>3}, on {arch:>11} at lr {lr:.4g}: "
                                   f"test {trained[lr]}")
                    result = trained[lr]
                    accuracy[i, j, a, c], lrs[i, j, a, c] = result.accuracies, lr
                    if result.val_accuracies:
                        valid[i, j, a, c] = result.val_accuracies
                    bar.update(1)
    bar.close()
    # (set, ipc, arch): the best mean validation accuracy ("own" when nothing was validated)
    scores = np.nanmean(valid, axis=-1) if cfg.lr_grid else np.zeros(shape[:4])
    chosen = np.nan_to_num(scores, nan=-1.0).argmax(axis=-1)
    at_chosen = np.take_along_axis(accuracy, chosen[..., None, None], axis=3)[:, :, :, 0]
    dims = ("set", "ipc", "arch", "lr_choice", "model")
    fraction = {"units": "fraction"}
    return make_results(
        {
            "accuracy": (dims, accuracy, {**fraction, "long_name": "test accuracy"}),
            "val_accuracy": (dims, valid, {**fraction, "long_name": "validation accuracy"}),
            "lr": (dims[:4], lrs, {"long_name": "training lr"}),
            "chosen": (dims[:3], np.asarray(choices)[chosen],
                       {"long_name": "lr choice with the best validation accuracy"}),
            "chosen_accuracy": (("set", "ipc", "arch", "model"), at_chosen, {
                **fraction, "long_name": "test accuracy at the lr chosen on validation"}),
        },
        coords={"set": names, "ipc": list(cfg.ipcs), "arch": list(cfg.archs),
                "lr_choice": list(choices), "model": np.arange(cfg.models)},
        config=cfg,
        seed=base.seed,
        device=base.device,
        synthetic_sets=files,
        test_images_used=len(test),
        protocol="paper" if cfg == PRESETS["paper"] else "reduced",
    )


def table(ds: xr.Dataset) -> str:
    """Markdown: per set, each architecture's test accuracy at every IPC (side by side), mean +-
    std over the networks, with the set's own lr; with an lr grid, also at the lr chosen on
    validation (that lr)."""
    header = ["training set (ConvNet-distilled)", "lr"] + [
        f"{a}, IPC {int(i)}" for a in ds.arch.values for i in ds.ipc.values]
    grid = ds.sizes["lr_choice"] > 1
    rows = []
    for name in ds.set.values:
        own_row = [str(name).replace("/", " / "), "the set's own"]
        chosen_row = ["", "chosen on validation"]
        for arch in ds.arch.values:
            for ipc in ds.ipc.values:
                at = ds.sel(set=name, arch=arch, ipc=ipc)
                own_row.append(f"{spread(at.accuracy.sel(lr_choice='own').values)} "
                               f"(lr {float(at.lr.sel(lr_choice='own')):.3g})")
                choice = str(at.chosen.values)
                chosen_row.append(f"{spread(at.accuracy.sel(lr_choice=choice).values)} "
                                  f"(lr {float(at.lr.sel(lr_choice=choice)):.3g})")
        rows += [own_row, chosen_row] if grid else [own_row]
    return markdown_table(header, rows)


def notes(ds: xr.Dataset) -> str:
    """What a cell is."""
    cfg = ds.attrs["config"]
    chosen = ("; 'chosen on validation': at the lr of the grid or the set's own with the best "
              "mean validation accuracy" if ds.sizes["lr_choice"] > 1 else
              "; no lr grid was tried (lr_grid is empty)")
    return (
        f"Test accuracy (%), mean +- std over {ds.sizes['model']} networks of each architecture "
        f"(sample std, ddof 1; different initialisations), trained {cfg['epochs']} epochs on "
        f"the set with its own lr (a distilled set's learned beta; 0.01 for random real)"
        f"{chosen}. Tested on {ds.attrs['test_images_used']} test images (a fixed "
        "class-balanced subset when fewer than the test set)."
    )


def plot(nc: Path, png: Path) -> Figure:
    """Bars of mean +- std over the networks per architecture and set at the chosen lr, one
    panel per IPC, every network a dot."""
    ds = load_results(nc)
    frame = (100 * ds.chosen_accuracy).to_dataframe().reset_index()
    names = [str(n) for n in ds.set.values]
    with sns.axes_style(STYLE):
        fig = Figure(figsize=(5 + 1.6 * ds.sizes["arch"] * ds.sizes["ipc"], 4.5),
                     layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, ds.sizes["ipc"], sharey=True))
        for ax, ipc in zip(axes, ds.ipc.values):
            at = frame[frame.ipc == ipc]
            sns.barplot(data=at, x="arch", y="chosen_accuracy", hue="set", hue_order=names,
                        errorbar="sd", capsize=0.1, ax=ax, legend=ax is axes[0], alpha=0.8)
            sns.stripplot(data=at, x="arch", y="chosen_accuracy", hue="set", hue_order=names,
                          dodge=True, palette=["black"] * len(names), size=3, ax=ax,
                          legend=False)
            ax.set(title=f"IPC {int(ipc)}", xlabel="", ylabel="test accuracy (%)")
        fig.suptitle("Cross-architecture transfer: mean +- std over networks (dots: each network)")
    save_png(fig, png)
    return fig


if __name__ == "__main__":
    run_experiment(NAME, CrossArchConfig, PRESETS, __doc__, main, table, notes=notes, plot=plot,
                   sets=plot_experiment_sets)

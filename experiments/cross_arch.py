"""The transfer table: sets distilled with ConvNet, evaluated on other architectures.

    python experiments/cross_arch.py                  # small CPU default (reduced widths/protocol)
    python experiments/cross_arch.py --preset paper   # full ResNet-18 / ViT, 1000 epochs, GPU

Distils (or reuses from ./cache, when another experiment made the same run) `tesla` sets with hard
labels and with SLA using ConvNet experts, then trains fresh ConvNet, ConvNetD4, ResNet-18 and ViT
models on them and on a random real subset of the same size, all in one protocol
(docs/reference.md section 6; every architecture trained with the set's learned lr, as MTT's transfer table does).
Writes results/cross_arch/cross_arch.{nc,png,md} and cross_arch_sets.png (the distilled sets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from tesla_func.augment import DSA
from tesla_func.data import load_dataset
from tesla_func.distill import DistillConfig
from tesla_func.evaluate import EvalConfig, evaluate
from tesla_func.experiment import distill_cached, distill_run, ensure_experts, run_experiment
from tesla_func.experts import ExpertConfig
from tesla_func.plots import plot_bar, plot_experiment_sets
from tesla_func.results import make_results, markdown_table, percent
from tesla_func.sampling import per_class_indices

NAME = "cross_arch"


@dataclass(frozen=True)
class CrossArchConfig:
    # experts and distillation: main_table's defaults of the revision that made
    # results/cross_arch (main_table has since moved to T = 60, lr_img 1000, a clipped beta)
    experts: ExpertConfig = ExpertConfig(dataset="fashion-mnist", num_experts=3, epochs=6, width=32)
    distill: DistillConfig = DistillConfig(
        iterations=80,
        syn_steps=20,
        match_epochs=2,
        max_start_epoch=3,
        lr_img=300.0,
        lr_lr=1.0,
        eval_epochs=200,
        eval_models=2,  # models per architecture (the run's own evaluation uses 3, as main_table)
    )
    ipc: int = 10
    sets: tuple[str, ...] = ("tesla/hard",)  # method/label strategy distilled with ConvNet
    archs: tuple[str, ...] = ("convnet", "convnetd4", "resnet18", "vit")
    resnet_width: int = 8  # ResNet-18 first-stage width (64 is the standard network)
    vit_dim: int = 64  # ViT token width (library default 128)
    vit_depth: int = 4  # ViT blocks (library default 6)
    batch_syn_max: int = 20  # batch_syn = min(ipc * classes, this)
    threads: int = 0  # torch CPU threads on the command-line path; 0 = torch's default


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
        resnet_width=64,
        vit_dim=128,
        vit_depth=6,
        batch_syn_max=500,
    ),
}


def arch_kwargs(cfg: CrossArchConfig, arch: str) -> dict:
    """The constructor arguments of each architecture under ``cfg`` (widths reduced on CPU)."""
    width = cfg.experts.width
    return {
        "convnet": {"width": width},
        "convnetd4": {"width": width},
        "resnet18": {"width": cfg.resnet_width},
        "vit": {"dim": cfg.vit_dim, "depth": cfg.vit_depth, "mlp_dim": 2 * cfg.vit_dim},
    }[arch]


def main(cfg: CrossArchConfig) -> xr.Dataset:
    base = cfg.distill
    experts_dir = ensure_experts(cfg.experts, device=base.device)
    dataset = load_dataset(cfg.experts.dataset)
    k = dataset.info.num_classes
    index = per_class_indices(dataset.train_labels, cfg.ipc,
                              torch.Generator().manual_seed(base.seed), k)
    training_sets = {"random/real": (dataset.train_images[index], dataset.train_labels[index],
                                     0.01)}
    sets = {}  # panel title -> synthetic.safetensors of the run (the sets figure)
    for name in cfg.sets:
        method, strategy = name.split("/")
        # eval_models=3: the run's own final evaluation, as main_table's, so its runs are shared
        run = distill_run(base, experts_dir, ipc=cfg.ipc, batch_syn_max=cfg.batch_syn_max,
                          num_classes=k, method=method, label_strategy=strategy, eval_models=3)
        distiller = distill_cached(run, dataset)
        synthetic = distiller.synthetic_set()
        training_sets[name] = (synthetic.images, synthetic.labels, synthetic.lr)
        sets[f"{name}, IPC {cfg.ipc}"] = str(distiller.out / "synthetic.safetensors")
    accuracy = np.full((len(training_sets), len(cfg.archs), base.eval_models), np.nan)
    for i, (images, labels, lr) in enumerate(training_sets.values()):
        for j, arch in enumerate(cfg.archs):
            protocol = EvalConfig(
                arch=arch,
                arch_kwargs=arch_kwargs(cfg, arch),
                epochs=base.eval_epochs,
                lr=lr,
                num_models=base.eval_models,
                seed=base.seed,
                device=base.device,
                progress=False,
            )
            result = evaluate(images, labels, dataset.test_images, dataset.test_labels, protocol,
                              DSA(), num_classes=k)
            accuracy[i, j] = result.accuracies
            print(f"{list(training_sets)[i]:>12} on {arch:>9}: {result}")
    return make_results(
        {"accuracy": (("set", "arch", "model"), accuracy, {"units": "fraction"})},
        coords={
            "set": list(training_sets),
            "arch": list(cfg.archs),
            "model": np.arange(base.eval_models),
        },
        config=cfg,
        seed=base.seed,
        device=base.device,
        experts_dir=str(experts_dir),
        synthetic_sets=sets,
        protocol="paper" if cfg == PRESETS["paper"] else "reduced",
    )


def table(ds: xr.Dataset) -> str:
    header = ["training set (ConvNet-distilled)"] + [str(a) for a in ds.arch.values]
    rows = []
    for name in ds.set.values:
        row = [str(name).replace("/", " / ")]
        for arch in ds.arch.values:
            values = ds.accuracy.sel(set=name, arch=arch).values
            row.append(percent(float(np.mean(values)), float(np.std(values))))
        rows.append(row)
    return markdown_table(header, rows)


if __name__ == "__main__":
    run_experiment(
        NAME,
        CrossArchConfig,
        PRESETS,
        __doc__,
        main,
        table,
        notes="Test accuracy (%), mean +- std over the evaluation models; every architecture is "
        "trained with the set's learned lr (random real: 0.01). On CPU ResNet-18 and ViT "
        "are narrower than the standard networks.",
        plot=lambda nc, png: plot_bar(
            nc, png, x="arch", hue="set", title="Cross-architecture transfer"
        ),
        sets=plot_experiment_sets,
    )

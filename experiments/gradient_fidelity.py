"""What TESLA's two-pass truncation costs: `tesla` against `exact` gradients on real expert
segments, then distillation with each from the same seeds.

    python experiments/gradient_fidelity.py                  # small CPU default (Fashion-MNIST)
    python experiments/gradient_fidelity.py --preset paper   # CIFAR-10 scale, for a GPU
    python experiments/gradient_fidelity.py --steps 1 5 20 --segments 5 --distill-seeds 0 1

Part 1, gradient fidelity. ``tesla`` (two-pass) is the first-order truncation of the MTT gradient
and ``exact`` (adjoint) the MTT gradient itself (README, proofs/b_two_pass.md, proofs/c_adjoint.md).
Both are computed on real expert segments (start theta*_t, target theta*_{t+M}), synthetic images
initialised from random real images, the very same minibatches and the same replayed DSA, and
compared (g = dL/dX over all images, d = dL/dbeta)::

    cosine = <g_tesla, g_exact> / (|g_tesla| |g_exact|)    relative error = |g_tesla - g_exact| / |g_exact|
    lr relative error = |d_tesla - d_exact| / |d_exact|     lr sign agreement = [sign d_tesla = sign d_exact]

one factor at a time around a base point (``base_steps``, ``base_start_epoch``, ``base_lr``):
against the number of student steps T, against the start epoch t on the expert trajectory, and
against the student lr beta. Every point is measured on the same ``segments`` random draws (expert,
initial images, minibatches, DSA parameters), so the sweeps are paired.

Part 2, distillation. Algorithm 1 with ``method="tesla"`` and with ``method="exact"`` from the same
seed: the same initial images and the same expert / start-epoch / minibatch / DSA draws (the
generator's use does not depend on the method), so only the gradient differs. Hard labels. The
runs go through ``tesla_func.experiment.distill_cached`` (cache/runs/, one folder per config), so
a killed run resumes and a run another experiment already made (experiments/main_table.py's IPC 1
`tesla` / `exact` rows with the default settings) is reused. Each set is evaluated once at the
end, beside the random-real baseline of the same protocol (``random_real_baseline``: the same
real images the distillation starts from, trained with the initial beta).

Writes results/gradient_fidelity/gradient_fidelity.{nc,png,md} and gradient_fidelity_distill.png
(the accuracies). The default is a reduced protocol (ConvNet width 32, 3 experts of 6 epochs, 300
evaluation epochs): its accuracies compare the two methods with each other, not with published
numbers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import Tensor
from tqdm.auto import tqdm

from tesla_func.augment import DSA, ReplayedDSA
from tesla_func.data import Dataset, load_dataset
from tesla_func.distill import DistillConfig
from tesla_func.evaluate import random_real_subset
from tesla_func.experiment import (
    distill_cached,
    ensure_experts,
    markdown_table,
    parse_config,
    percent,
    random_real_baseline,
    torch_threads,
    write_outputs,
)
from tesla_func.experts import ExpertConfig, ExpertTrajectory, load_experts
from tesla_func.matching import MatchResult, match_trajectory
from tesla_func.models import ConvNet
from tesla_func.plots import plot_bar, plot_sweeps
from tesla_func.results import make_dataset, records_to_dataset

NAME = "gradient_fidelity"
METHODS = ("tesla", "exact")  # compared; `exact` (= unrolled MTT up to rounding) is the reference
SWEEPS = ("steps", "start_epoch", "lr")  # swept one at a time around the base point
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class FidelityConfig:
    """Both parts of the experiment; the defaults are the small CPU run (about 10 minutes)."""

    dataset: str = "fashion-mnist"
    # experts (cached under ./cache, shared with the other experiments)
    num_experts: int = 3
    expert_epochs_trained: int = 6  # E: checkpoints 0..E per expert
    width: int = 32  # ConvNet width of experts, students and evaluation models
    expert_epochs: int = 2  # M: target = start epoch + M (both parts)
    # part 1: gradient fidelity
    dtype: str = "float64"  # float64: the differences are the truncation's, not rounding's
    ipc: int = 10  # synthetic images per class, initialised from random real images
    batch_syn: int = 20  # images per student step (non-overlapping minibatches)
    steps: tuple[int, ...] = (1, 2, 5, 10, 20, 40)  # T, at (base_start_epoch, base_lr)
    start_epochs: tuple[int, ...] = (0, 1, 2, 3, 4)  # t, at (base_steps, base_lr); t + M <= E
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)  # beta, at (base_steps, base_start_epoch)
    base_steps: int = 10
    base_start_epoch: int = 0
    base_lr: float = 1e-2  # the experts' training lr
    segments: int = 4  # random draws per point (the `segment` dim)
    dsa: bool = True  # replayed DSA on the synthetic minibatches (both parts)
    # part 2: distillation, tesla vs exact (PROTOCOL.md section 4, scaled down)
    distill_seeds: tuple[int, ...] = (0, 1)  # one tesla and one exact run per seed
    distill_ipc: int = 1
    distill_iterations: int = 100
    distill_syn_steps: int = 10  # T
    distill_max_start_epoch: int = 3  # t ~ U{0 .. max - 1}
    distill_batch_syn_max: int = 100  # batch_syn = min(ipc * classes, this)
    distill_lr_init: float = 0.0  # initial beta; 0 = the experts' lr
    lr_img: float = 100.0
    # on log(beta). 1e-2 is what the committed results used; it barely moves beta (see
    # DistillConfig.lr_lr: main_table's runs use 1.0, which distils much better).
    lr_lr: float = 1e-2
    # evaluation protocol (PROTOCOL.md section 6, reduced: fewer epochs and models)
    eval_epochs: int = 300
    eval_models: int = 3
    seed: int = 0
    # torch CPU threads; 0 = leave torch's default. 1 because on 2 cores shared with other jobs
    # a second thread made a float64 step of 20 images 10x slower (8 s vs 0.8 s), measured here.
    threads: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(
                f"FidelityConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"
            )
        last = max((*self.start_epochs, self.base_start_epoch)) + self.expert_epochs
        if last > self.expert_epochs_trained:
            raise ValueError(
                f"start epochs up to {last - self.expert_epochs} with expert_epochs "
                f"{self.expert_epochs} need checkpoint {last}, but the experts are "
                f"trained for {self.expert_epochs_trained} epochs"
            )
        if min((*self.steps, self.base_steps, self.segments, self.batch_syn, self.ipc)) < 1:
            raise ValueError("steps, base_steps, segments, batch_syn and ipc must be >= 1")
        if min((*self.lrs, self.base_lr)) <= 0:
            raise ValueError("student learning rates must be > 0")

    @property
    def base_point(self) -> dict[str, float]:
        return {"steps": self.base_steps, "start_epoch": self.base_start_epoch, "lr": self.base_lr}

    def points(self) -> list[tuple[int, int, float]]:
        """(T, t, beta) of the three sweeps through the base point, each once."""
        t0, s0, b0 = self.base_steps, self.base_start_epoch, self.base_lr
        points = [(t, s0, b0) for t in self.steps] + [(t0, s, b0) for s in self.start_epochs]
        points += [(t0, s0, b) for b in self.lrs] + [(t0, s0, b0)]
        return sorted(set(points))


PRESETS = {
    # CIFAR-10 at the authors' IPC 10 settings (ZCA, 30/2/20, lr_img 100; lr_lr 1e-5 on raw beta
    # = 1e-3 is about 1e-5 / beta^2 = 10 on log beta), T up to 80, start epochs over the whole 50-epoch trajectory,
    # 1000 evaluation epochs, 3 seeds.
    "paper": FidelityConfig(
        dataset="cifar10",
        num_experts=20,
        expert_epochs_trained=50,
        width=128,
        ipc=10,
        batch_syn=100,
        steps=(1, 2, 5, 10, 20, 30, 50, 80),
        start_epochs=(0, 5, 10, 20, 30, 40, 48),
        lrs=(1e-4, 1e-3, 3e-3, 1e-2, 3e-2),
        base_steps=30,
        base_start_epoch=10,
        base_lr=1e-2,
        segments=10,
        distill_seeds=(0, 1, 2),
        distill_ipc=10,
        distill_iterations=5000,
        distill_syn_steps=30,
        distill_max_start_epoch=20,
        distill_lr_init=1e-3,
        lr_img=100.0,
        lr_lr=10.0,
        eval_epochs=1000,
        eval_models=5,
        threads=0,
        device="cuda",
    ),
}


def _expert_config(cfg: FidelityConfig) -> ExpertConfig:
    return ExpertConfig(
        dataset=cfg.dataset,
        num_experts=cfg.num_experts,
        epochs=cfg.expert_epochs_trained,
        width=cfg.width,
    )


# ----------------------------------------------------------------------------------------------
# Part 1: gradient fidelity


@dataclass(frozen=True)
class Segment:
    """One random draw shared by every point of the sweeps."""

    expert: ExpertTrajectory  # params in the measuring dtype, on the device
    images: Tensor  # (N, C, H, W) random real images, ipc per class, class-major
    labels: Tensor  # (N,) class indices
    batches: tuple[
        Tensor, ...
    ]  # max T minibatches (batch_syn,) of indices; T steps use the first T
    augment: ReplayedDSA | None  # DSA parameters of max T steps, replayed in every pass


def draw_segment(
    cfg: FidelityConfig,
    index: int,
    dataset: Dataset,
    experts: list[ExpertTrajectory],
    max_steps: int,
) -> Segment:
    """Segment ``index``: expert ``index % num_experts`` and draws from seed (cfg.seed, index)."""
    state = np.random.SeedSequence([cfg.seed, index]).generate_state(1, np.uint64)[0]
    gen = torch.Generator().manual_seed(int(state))
    dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
    images, labels = random_real_subset(
        dataset.train_images,
        dataset.train_labels,
        cfg.ipc,
        gen,
        num_classes=dataset.info.num_classes,
    )
    n, b = len(labels), cfg.batch_syn
    if b > n:
        raise ValueError(
            f"FidelityConfig.batch_syn {b} is larger than the synthetic set "
            f"(ipc {cfg.ipc} x {dataset.info.num_classes} classes = {n} images)"
        )
    per = n // b  # non-overlapping minibatches per permutation
    perms = [torch.randperm(n, generator=gen) for _ in range(math.ceil(max_steps / per))]
    batches = tuple(p[j * b : (j + 1) * b].to(device) for p in perms for j in range(per))[
        :max_steps
    ]
    augment = (
        DSA().replayable([b] * max_steps, gen, device=device, dtype=dtype) if cfg.dsa else None
    )
    expert = experts[index % len(experts)]
    expert = dataclasses.replace(
        expert, params=tuple({k: v.to(device, dtype) for k, v in p.items()} for p in expert.params)
    )
    return Segment(expert, images.to(device, dtype), labels.to(device), batches, augment)


def agreement(approx: MatchResult, reference: MatchResult) -> dict[str, float]:
    """How close ``approx``'s gradients are to ``reference``'s (images: cosine, relative error;
    lr: relative error and whether the signs agree)."""
    a, b = approx.images_grad.flatten(), reference.images_grad.flatten()
    da, db = float(approx.lr_grad), float(reference.lr_grad)
    return {
        "images_cosine": float(a @ b / (a.norm() * b.norm())),
        "images_relative_error": float((a - b).norm() / b.norm()),
        "lr_relative_error": abs(da - db) / abs(db) if db else math.inf,
        "lr_sign_agreement": float(math.copysign(1, da) == math.copysign(1, db)),
    }


def measure_fidelity(
    cfg: FidelityConfig, dataset: Dataset, experts: list[ExpertTrajectory]
) -> xr.Dataset:
    """Every point of the three sweeps on every segment: agreement and per-method records."""
    points = cfg.points()
    model = ConvNet(experts[0].config).to(cfg.device, DTYPES[cfg.dtype])
    compared, per_method = [], []
    bar = tqdm(
        total=cfg.segments * sum(t for t, _, _ in points), desc="tesla vs exact", unit="step"
    )
    for index in range(cfg.segments):
        seg = draw_segment(cfg, index, dataset, experts, max(t for t, _, _ in points))
        for steps, start, lr in points:
            key = {"steps": steps, "start_epoch": start, "lr": lr, "segment": index}
            results = {}
            for method in METHODS:
                tic = time.perf_counter()
                results[method] = match_trajectory(
                    model,
                    seg.expert.params[start],
                    seg.expert.params[start + cfg.expert_epochs],
                    seg.images,
                    seg.labels,
                    torch.tensor(lr, dtype=DTYPES[cfg.dtype]),
                    seg.batches[:steps],
                    method=method,
                    augment=seg.augment,
                )
                per_method.append(
                    {
                        **key,
                        "method": method,
                        "seconds": time.perf_counter() - tic,
                        "images_grad_norm": float(results[method].images_grad.norm()),
                        "lr_grad": float(results[method].lr_grad),
                    }
                )
            compared.append(
                {
                    **key,
                    "loss": float(results["exact"].loss),
                    "expert": seg.expert.header.get("expert_index", -1),
                    **agreement(results["tesla"], results["exact"]),
                }
            )
            bar.update(steps)
    bar.close()
    dims = ["steps", "start_epoch", "lr", "segment"]
    ds = xr.merge(
        [records_to_dataset(compared, dims), records_to_dataset(per_method, ["method", *dims])],
        join="exact",
        combine_attrs="drop",
    )
    return ds.reindex({"method": list(METHODS)})  # a dict: reindex(method=...) means fill method


# ----------------------------------------------------------------------------------------------
# Part 2: distillation with each method


def _distill_config(
    cfg: FidelityConfig, experts_dir: Path, method: str, seed: int, num_classes: int
) -> DistillConfig:
    return DistillConfig(
        experts_dir=str(experts_dir),
        dataset=cfg.dataset,
        ipc=cfg.distill_ipc,
        method=method,
        labels="hard",
        iterations=cfg.distill_iterations,
        syn_steps=cfg.distill_syn_steps,
        expert_epochs=cfg.expert_epochs,
        max_start_epoch=cfg.distill_max_start_epoch,
        batch_syn=min(cfg.distill_ipc * num_classes, cfg.distill_batch_syn_max),
        lr_img=cfg.lr_img,
        lr_lr=cfg.lr_lr,
        lr_init=cfg.distill_lr_init or None,
        dsa=cfg.dsa,
        eval_epochs=cfg.eval_epochs,
        eval_models=cfg.eval_models,
        seed=seed,
        device=cfg.device,
    )


def distill_both(cfg: FidelityConfig, experts_dir: Path, dataset: Dataset) -> xr.Dataset:
    """Per seed: distil with each method (cached runs) and evaluate; the random-real baseline."""
    accuracy, log, reloaded = [], [], 0
    for seed in cfg.distill_seeds:
        for method in METHODS:
            distiller = distill_cached(
                _distill_config(cfg, experts_dir, method, seed, dataset.info.num_classes), dataset
            )
            reloaded += distiller.last_eval is None  # finished earlier: nothing evaluated yet
            result = distiller.last_eval or distiller.evaluate()
            accuracy += [
                {"set": method, "seed": seed, "model": k, "accuracy": a}
                for k, a in enumerate(result.accuracies)
            ]
            steps = distiller.state.log  # per iteration
            log += [
                {
                    "method": method,
                    "seed": seed,
                    "iteration": i + 1,
                    "matching_loss": loss,
                    "learned_lr": lr,
                    "seconds_per_iteration": sec,
                }
                for i, (loss, lr, sec) in enumerate(
                    zip(steps["loss"], steps["lr"], steps["seconds"])
                )
            ]
        baseline = random_real_baseline(
            dataset, cfg.distill_ipc, distiller.protocol(lr=distiller.beta0), seed
        )
        accuracy += [
            {"set": "random real", "seed": seed, "model": k, "accuracy": a}
            for k, a in enumerate(baseline.accuracies)
        ]
    ds = xr.merge(
        [
            records_to_dataset(accuracy, ["set", "seed", "model"]),
            records_to_dataset(log, ["method", "seed", "iteration"]),
        ],
        join="exact",
        combine_attrs="drop",
    )
    ds.attrs["runs_reloaded"] = reloaded  # of len(seeds) x len(METHODS), from the run cache
    # Table and figure order; a dict, since reindex(method=...) is its fill-method argument.
    return ds.reindex({"set": ["random real", *METHODS], "method": list(METHODS)})


# ----------------------------------------------------------------------------------------------
# The experiment


def main(cfg: FidelityConfig) -> xr.Dataset:
    with torch_threads(cfg.threads):
        tic = time.perf_counter()
        experts_dir = ensure_experts(_expert_config(cfg), device=cfg.device)
        experts_seconds = time.perf_counter() - tic
        experts = load_experts(experts_dir)
        dataset = load_dataset(cfg.dataset)  # the experts' default normalisation (and ZCA)
        tic = time.perf_counter()
        fidelity = measure_fidelity(cfg, dataset, experts)
        fidelity_seconds = time.perf_counter() - tic
        tic = time.perf_counter()
        distilled = distill_both(cfg, experts_dir, dataset)
        distill_seconds = time.perf_counter() - tic
        merged = xr.merge([fidelity, distilled], join="exact", combine_attrs="drop")
        runs = len(cfg.distill_seeds) * len(METHODS)
        ds = make_dataset(
            dict(merged.data_vars),
            coords=dict(merged.coords),
            config=cfg,
            seed=cfg.seed,
            device=cfg.device,
            experts_dir=str(experts_dir),
            base_point=cfg.base_point,
            measured_dtype=cfg.dtype,
            seconds_experts=experts_seconds,
            seconds_fidelity=fidelity_seconds,
            seconds_distill=distill_seconds,
            runs_reloaded=f"{distilled.attrs['runs_reloaded']} of {runs}",
            expert_test_accuracy=[list(e.test_accuracy) for e in experts],
            protocol="paper" if cfg == PRESETS["paper"] else "reduced",
        )
    units = {"seconds": "s", "accuracy": "fraction", "seconds_per_iteration": "s"}
    for name, unit in units.items():
        ds[name].attrs["units"] = unit
    return ds


def plot(nc: Path, png: Path) -> None:
    """The sweeps (``png``) and the distillation accuracies (``<name>_distill.png``), from ``nc``."""
    plot_sweeps(
        nc,
        png,
        variables=("images_cosine", "images_relative_error", "lr_relative_error"),
        sweeps=SWEEPS,
        replicate=("segment",),
        title="tesla (two-pass) vs exact gradient: mean +- std over segments",
    )
    plot_bar(
        nc,
        png.with_name(f"{png.stem}_distill.png"),
        var="accuracy",
        x=None,
        hue="set",
        replicate=("model", "seed"),
        title="Distillation: tesla vs exact, same seeds",
    )


def _mean_std(da: xr.DataArray) -> tuple[float, float]:
    """Mean and (population) std over every finite element."""
    values = da.values[np.isfinite(da.values)]
    return float(values.mean()), float(values.std())


def _pm(da: xr.DataArray, digits: int = 3) -> str:
    mean, std = _mean_std(da)
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def _line(ds: xr.Dataset, dim: str) -> xr.Dataset:
    """The sweep along ``dim`` (the other swept dims at their base values), measured points only."""
    base = ds.attrs["base_point"]
    line = ds.sel({d: base[d] for d in SWEEPS if d != dim})
    return line.dropna(dim, how="all", subset=["images_cosine"])


def _final(ds: xr.Dataset, var: str, method: str, last: int = 10) -> float:
    """``var`` of the distillation log averaged over the last ``last`` iterations and the seeds."""
    return float(ds[var].sel({"method": method}).isel(iteration=slice(-last, None)).mean())


def table(ds: xr.Dataset) -> str:
    """Markdown: agreement along each sweep, then the distillation accuracies."""
    base = ds.attrs["base_point"]
    rows = []
    for dim in SWEEPS:
        line = _line(ds, dim)
        for value in line[dim].values:
            point = line.sel({dim: value})
            at = {**base, dim: value.item()}
            rows.append(
                [
                    dim,
                    at["steps"],
                    at["start_epoch"],
                    f"{at['lr']:g}",
                    _pm(point.images_cosine, 4),
                    _pm(point.images_relative_error),
                    _pm(point.lr_relative_error),
                    f"{100 * _mean_std(point.lr_sign_agreement)[0]:.0f}%",
                ]
            )
    fidelity = markdown_table(
        [
            "varied",
            "T",
            "start epoch",
            "beta",
            "cosine dL/dX",
            "rel. error dL/dX",
            "rel. error dL/dbeta",
            "dL/dbeta sign agrees",
        ],
        rows,
    )
    drows = []
    for name in ds.set.values:
        acc = ds.accuracy.sel(set=name)
        is_run = name in ds.method.values
        drows.append(
            [
                f"distilled with `{name}`" if is_run else str(name),
                percent(*_mean_std(acc)),
                " / ".join(f"{100 * float(acc.sel(seed=s).mean()):.1f}" for s in ds.seed.values),
                f"{_final(ds, 'matching_loss', name):.4f}" if is_run else "-",
                f"{_final(ds, 'learned_lr', name, last=1):.4g}" if is_run else "-",
            ]
        )
    config = ds.attrs["config"]
    distill = markdown_table(
        [
            f"set (IPC {config['distill_ipc']})",
            "accuracy (%)",
            f"per seed {ds.seed.values.tolist()}",
            "matching loss, last 10 its",
            "final beta",
        ],
        drows,
    )
    return (
        f"Gradient agreement of `tesla` with `exact` (mean +- std over "
        f"{ds.sizes['segment']} segments; {ds.attrs['measured_dtype']}):\n\n{fidelity}\n\n"
        f"Distillation, {config['distill_iterations']} iterations of T = "
        f"{config['distill_syn_steps']} from the same seeds (accuracy mean +- std over seeds x "
        f"{ds.sizes['model']} evaluation models):\n\n{distill}"
    )


def finding(ds: xr.Dataset) -> str:
    """One paragraph stating what the numbers say, written from the numbers."""
    base = ds.attrs["base_point"]
    at_base = ds.sel(base)

    def err(point: xr.Dataset) -> str:
        return f"{100 * _mean_std(point.images_relative_error)[0]:.1f}%"

    def along(dim: str) -> str:
        line = _line(ds, dim)
        values = [line.sel({dim: v}) for v in line[dim].values]
        return (
            f"{', '.join(err(v) for v in values)} at {dim} = "
            f"{', '.join(f'{v[dim].item():g}' for v in values)}"
        )

    acc = {name: _mean_std(ds.accuracy.sel(set=name)) for name in ds.set.values}
    per_seed = (ds.accuracy.sel(set="exact") - ds.accuracy.sel(set="tesla")).mean("model") * 100
    spread = 100 * max(acc["exact"][1], acc["tesla"][1])
    gap = float(per_seed.mean())
    verdict = (
        "within the spread over evaluation models"
        if abs(gap) <= spread
        else "larger than the spread over evaluation models"
    )
    return (
        f"**Finding.** At the base point (T = {base['steps']}, start epoch "
        f"{base['start_epoch']}, beta = {base['lr']:g}) the two-pass `tesla` image gradient has "
        f"cosine {_mean_std(at_base.images_cosine)[0]:.4f} with the exact MTT gradient and a "
        f"relative error of {err(at_base)}; its beta gradient is off by "
        f"{100 * _mean_std(at_base.lr_relative_error)[0]:.0f}% (same sign in "
        f"{100 * _mean_std(at_base.lr_sign_agreement)[0]:.0f}% of segments). The image "
        f"gradient's relative error is {along('steps')}; {along('lr')}; {along('start_epoch')}. "
        f"Distilled sets reached {percent(*acc['tesla'])}% with `tesla` and "
        f"{percent(*acc['exact'])}% with `exact` (random real {percent(*acc['random real'])}%); "
        f"exact - tesla = {', '.join(f'{v:+.1f}' for v in per_seed.values)} points per seed, "
        f"{gap:+.1f} on average, {verdict} ({spread:.1f})."
    )


if __name__ == "__main__":
    config = parse_config(FidelityConfig, PRESETS, __doc__)
    started = time.perf_counter()
    results = main(config)
    results.attrs["seconds_total"] = time.perf_counter() - started
    text = table(results)
    notes = (
        finding(results) + "\n\n"
        f"Wall time: {results.attrs['seconds_total'] / 60:.1f} min in all (gradient "
        f"fidelity {results.attrs['seconds_fidelity'] / 60:.1f} min, distillation "
        f"{results.attrs['seconds_distill'] / 60:.1f} min with "
        f"{results.attrs['runs_reloaded']} runs reloaded from the cache, experts "
        f"{results.attrs['seconds_experts'] / 60:.1f} min: 0 when cached). "
        "Accuracies: test accuracy on the real test set; "
        + (
            "reduced CPU protocol: compare the rows with each other, not with published numbers."
            if results.attrs["protocol"] == "reduced"
            else "paper protocol."
        )
    )
    paths = write_outputs(results, NAME, table=text, notes=notes, plot=plot)
    print(text + "\n\n" + notes)
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))

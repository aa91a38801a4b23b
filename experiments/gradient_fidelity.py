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
a killed run resumes and a run another experiment already made is reused. Each set is evaluated once at the
end, beside the random-real baseline of the same protocol (``random_real_baseline``: the same
real images the distillation starts from, trained with the initial beta).

Writes results/gradient_fidelity/gradient_fidelity.{nc,png,md}, gradient_fidelity_distill.png
(the accuracies) and gradient_fidelity_sets.png (the distilled sets). The default is a reduced protocol (ConvNet width 32, 3 experts of 6 epochs, 300
evaluation epochs): its accuracies compare the two methods with each other, not with published
numbers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from tesla_func.data import Dataset, load_dataset
from tesla_func.distill import DistillConfig
from tesla_func.experiment import (
    distill_cached,
    distill_run,
    ensure_experts,
    random_real_baseline,
    run_experiment,
)
from tesla_func.experts import ExpertConfig, ExpertTrajectory, load_experts
from tesla_func.fidelity import agreement, draw_segment
from tesla_func.matching import match_trajectory
from tesla_func.models import ConvNet
from tesla_func.plots import plot_bar, plot_experiment_sets, plot_sweeps
from tesla_func.results import make_results, markdown_table, percent, records_to_results
from tesla_func.sampling import seeded_generator

NAME = "gradient_fidelity"
METHODS = ("tesla", "exact")  # compared; `exact` (= unrolled MTT up to rounding) is the reference
SWEEPS = ("steps", "start_epoch", "lr")  # swept one at a time around the base point
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class FidelityConfig:
    """Both parts of the experiment; the defaults are the small CPU run (about 10 minutes)."""

    # experts (cached under ./cache, shared with the other experiments)
    experts: ExpertConfig = ExpertConfig(dataset="fashion-mnist", num_experts=3, epochs=6, width=32)
    # part 2's runs (hard labels; method and seed set per run). Its match_epochs (M: target =
    # start epoch + M), dsa, device and seed are part 1's too.
    distill: DistillConfig = DistillConfig(
        ipc=1,
        iterations=100,
        syn_steps=10,
        match_epochs=2,
        max_start_epoch=3,
        lr_img=100.0,
        # on log(beta). 1e-2 is what the committed results used; it barely moves beta (see
        # DistillConfig.lr_lr: main_table's runs use 1.0, which distils much better).
        lr_lr=1e-2,
        lr_grad_clip=None,  # the committed results' (the library clips at 0.5 now)
        eval_epochs=300,  # evaluation protocol, reduced: fewer epochs and models
        eval_models=3,
    )
    distill_seeds: tuple[int, ...] = (0, 1)  # one tesla and one exact run per seed
    batch_syn_max: int = 100  # part 2: batch_syn = min(ipc * classes, this)
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
    # torch CPU threads; 0 = leave torch's default. 1 because on 2 cores shared with other jobs
    # a second thread made a float64 step of 20 images 10x slower (8 s vs 0.8 s), measured here.
    threads: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"FidelityConfig.dtype must be one of {sorted(DTYPES)}, "
                             f"got {self.dtype!r}")
        last = max((*self.start_epochs, self.base_start_epoch)) + self.distill.match_epochs
        if last > self.experts.epochs:
            raise ValueError(
                f"start epochs up to {last - self.distill.match_epochs} with match_epochs "
                f"{self.distill.match_epochs} need checkpoint {last}, but the experts are "
                f"trained for {self.experts.epochs} epochs"
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
    # = 1e-3 is about 1e-5 / beta^2 = 10 on log beta), T up to 80, start epochs over the whole
    # 50-epoch trajectory, 1000 evaluation epochs, 3 seeds.
    "paper": FidelityConfig(
        experts=ExpertConfig(dataset="cifar10", num_experts=20, epochs=50, width=128),
        distill=dataclasses.replace(
            FidelityConfig.distill, ipc=10, iterations=5000, syn_steps=30, max_start_epoch=20,
            lr_init=1e-3, lr_lr=10.0, eval_epochs=1000, eval_models=5, device="cuda",
        ),
        distill_seeds=(0, 1, 2),
        ipc=10,
        batch_syn=100,
        steps=(1, 2, 5, 10, 20, 30, 50, 80),
        start_epochs=(0, 5, 10, 20, 30, 40, 48),
        lrs=(1e-4, 1e-3, 3e-3, 1e-2, 3e-2),
        base_steps=30,
        base_start_epoch=10,
        segments=10,
        threads=0,
    ),
}


def measure_fidelity(
    cfg: FidelityConfig, dataset: Dataset, experts: list[ExpertTrajectory]
) -> xr.Dataset:
    """Every point of the three sweeps on every segment: agreement and per-method records.

    Segment ``i`` matches expert ``i % num_experts`` and draws its images, minibatches and DSA
    from stream (seed, i), so every point of the sweeps sees the same draws."""
    points, dtype, device = cfg.points(), DTYPES[cfg.dtype], cfg.distill.device
    max_steps, m = max(t for t, _, _ in points), cfg.distill.match_epochs
    model = ConvNet(experts[0].config).to(device, dtype)
    compared, per_method = [], []
    bar = tqdm(total=cfg.segments * sum(t for t, _, _ in points), desc="tesla vs exact",
               unit="step")
    for index in range(cfg.segments):
        seg = draw_segment(dataset, cfg.ipc, cfg.batch_syn, max_steps,
                           seeded_generator(cfg.distill.seed, index), dsa=cfg.distill.dsa,
                           device=device, dtype=dtype)
        expert = experts[index % len(experts)]
        params = [{k: v.to(device, dtype) for k, v in p.items()} for p in expert.params]
        for steps, start, lr in points:
            key = {"steps": steps, "start_epoch": start, "lr": lr, "segment": index}
            results = {}
            for method in METHODS:
                tic = time.perf_counter()
                results[method] = res = match_trajectory(
                    model, params[start], params[start + m], seg.images, seg.labels,
                    torch.tensor(lr, dtype=dtype), seg.batches[:steps], method=method,
                    augment=seg.augment,
                )
                per_method.append({**key, "method": method,
                                   "seconds": time.perf_counter() - tic,
                                   "images_grad_norm": float(res.images_grad.norm()),
                                   "lr_grad": float(res.beta_grad)})
            compared.append({**key, "loss": float(results["exact"].loss),
                             "expert": expert.header.get("expert_index", -1),
                             **agreement(results["tesla"], results["exact"])})
            bar.update(steps)
    bar.close()
    dims = ["steps", "start_epoch", "lr", "segment"]
    ds = xr.merge(
        [records_to_results(compared, dims), records_to_results(per_method, ["method", *dims])],
        join="exact",
        combine_attrs="drop",
    )
    return ds.reindex({"method": list(METHODS)})  # a dict: reindex(method=...) means fill method


def distill_both(cfg: FidelityConfig, experts_dir: Path, dataset: Dataset) -> xr.Dataset:
    """Per seed: distil with each method (cached runs) and evaluate; the random-real baseline."""
    accuracy, log, reloaded, sets = [], [], 0, {}
    for seed in cfg.distill_seeds:
        for method in METHODS:
            run = distill_run(cfg.distill, experts_dir, ipc=cfg.distill.ipc,
                              batch_syn_max=cfg.batch_syn_max,
                              num_classes=dataset.info.num_classes, method=method, seed=seed)
            distiller = distill_cached(run, dataset)
            reloaded += distiller.last_eval is None  # finished earlier: nothing evaluated yet
            sets[f"{method}, seed {seed}"] = str(distiller.out / "synthetic.safetensors")
            result = distiller.last_eval or distiller.evaluate()
            accuracy += [{"set": method, "seed": seed, "model": k, "accuracy": a}
                         for k, a in enumerate(result.accuracies)]
            steps = distiller.state.log  # per iteration
            log += [{"method": method, "seed": seed, "iteration": i + 1, "matching_loss": loss,
                     "learned_lr": lr, "seconds_per_iteration": sec}
                    for i, (loss, lr, sec) in enumerate(
                        zip(steps["loss"], steps["lr"], steps["seconds"]))]
        baseline = random_real_baseline(dataset, cfg.distill.ipc,
                                        distiller.protocol(lr=distiller.beta0), seed)
        accuracy += [{"set": "random real", "seed": seed, "model": k, "accuracy": a}
                     for k, a in enumerate(baseline.accuracies)]
    ds = xr.merge(
        [records_to_results(accuracy, ["set", "seed", "model"]),
         records_to_results(log, ["method", "seed", "iteration"])],
        join="exact",
        combine_attrs="drop",
    )
    ds.attrs["runs_reloaded"] = reloaded  # of len(seeds) x len(METHODS), from the run cache
    ds.attrs["synthetic_sets"] = sets  # panel title -> synthetic.safetensors (the sets figure)
    # Table and figure order; a dict, since reindex(method=...) is its fill-method argument.
    return ds.reindex({"set": ["random real", *METHODS], "method": list(METHODS)})


def main(cfg: FidelityConfig) -> xr.Dataset:
    started = time.perf_counter()
    experts_dir = ensure_experts(cfg.experts, device=cfg.distill.device)
    experts_seconds = time.perf_counter() - started
    experts = load_experts(experts_dir)
    dataset = load_dataset(cfg.experts.dataset)  # the experts' default normalisation (and ZCA)
    tic = time.perf_counter()
    fidelity = measure_fidelity(cfg, dataset, experts)
    fidelity_seconds = time.perf_counter() - tic
    tic = time.perf_counter()
    distilled = distill_both(cfg, experts_dir, dataset)
    distill_seconds = time.perf_counter() - tic
    merged = xr.merge([fidelity, distilled], join="exact", combine_attrs="drop")
    runs = len(cfg.distill_seeds) * len(METHODS)
    ds = make_results(
        dict(merged.data_vars),
        coords=dict(merged.coords),
        config=cfg,
        seed=cfg.distill.seed,
        device=cfg.distill.device,
        experts_dir=str(experts_dir),
        base_point=cfg.base_point,
        measured_dtype=cfg.dtype,
        seconds_experts=experts_seconds,
        seconds_fidelity=fidelity_seconds,
        seconds_distill=distill_seconds,
        seconds_total=time.perf_counter() - started,
        runs_reloaded=f"{distilled.attrs['runs_reloaded']} of {runs}",
        synthetic_sets=distilled.attrs["synthetic_sets"],
        expert_test_accuracy=[list(e.test_accuracy) for e in experts],
        protocol="paper" if cfg == PRESETS["paper"] else "reduced",
    )
    for name, unit in {"seconds": "s", "accuracy": "fraction", "seconds_per_iteration": "s"}.items():
        ds[name].attrs["units"] = unit
    return ds


def plot(nc: Path, png: Path) -> None:
    """The sweeps (``png``) and the distillation accuracies (``<name>_distill.png``), from ``nc``."""
    plot_sweeps(nc, png, variables=("images_cosine", "images_relative_error", "lr_relative_error"),
                sweeps=SWEEPS, replicate=("segment",),
                title="tesla (two-pass) vs exact gradient: mean +- std over segments")
    plot_bar(nc, png.with_name(f"{png.stem}_distill.png"), var="accuracy", x=None, hue="set",
             replicate=("model", "seed"), title="Distillation: tesla vs exact, same seeds")


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
    base, rows = ds.attrs["base_point"], []
    for dim in SWEEPS:
        line = _line(ds, dim)
        for value in line[dim].values:
            p, at = line.sel({dim: value}), {**base, dim: value.item()}
            rows.append([dim, at["steps"], at["start_epoch"], f"{at['lr']:g}",
                         _pm(p.images_cosine, 4), _pm(p.images_relative_error),
                         _pm(p.lr_relative_error),
                         f"{100 * _mean_std(p.lr_sign_agreement)[0]:.0f}%"])
    fidelity = markdown_table(["varied", "T", "start epoch", "beta", "cosine dL/dX",
                               "rel. error dL/dX", "rel. error dL/dbeta", "dL/dbeta sign agrees"],
                              rows)
    drows = []
    for name in ds.set.values:
        acc, run = ds.accuracy.sel(set=name), name in ds.method.values
        drows.append([
            f"distilled with `{name}`" if run else str(name), percent(*_mean_std(acc)),
            " / ".join(f"{100 * float(acc.sel(seed=s).mean()):.1f}" for s in ds.seed.values),
            f"{_final(ds, 'matching_loss', name):.4f}" if run else "-",
            f"{_final(ds, 'learned_lr', name, last=1):.4g}" if run else "-",
        ])
    config = ds.attrs["config"]["distill"]
    distill = markdown_table([f"set (IPC {config['ipc']})", "accuracy (%)",
                              f"per seed {ds.seed.values.tolist()}",
                              "matching loss, last 10 its", "final beta"], drows)
    return (
        f"Gradient agreement of `tesla` with `exact` (mean +- std over "
        f"{ds.sizes['segment']} segments; {ds.attrs['measured_dtype']}):\n\n{fidelity}\n\n"
        f"Distillation, {config['iterations']} iterations of T = {config['syn_steps']} from the "
        f"same seeds (accuracy mean +- std over seeds x {ds.sizes['model']} evaluation "
        f"models):\n\n{distill}"
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
    verdict = "within" if abs(gap) <= spread else "larger than"
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
        f"{gap:+.1f} on average, {verdict} the spread over evaluation models ({spread:.1f})."
    )


def notes(ds: xr.Dataset) -> str:
    """The finding, then where the time went."""
    a = ds.attrs
    return (
        finding(ds) + "\n\n"
        f"Wall time: {a['seconds_total'] / 60:.1f} min in all (gradient fidelity "
        f"{a['seconds_fidelity'] / 60:.1f} min, distillation {a['seconds_distill'] / 60:.1f} min "
        f"with {a['runs_reloaded']} runs reloaded from the cache, experts "
        f"{a['seconds_experts'] / 60:.1f} min: 0 when cached). Accuracies: test accuracy on the "
        "real test set."
    )


if __name__ == "__main__":
    run_experiment(NAME, FidelityConfig, PRESETS, __doc__, main, table, plot=plot, notes=notes,
                   sets=plot_experiment_sets)

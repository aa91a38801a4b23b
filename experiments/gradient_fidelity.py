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

Part 3, precision. Every method in float32 against the float64 ``unrolled`` gradient of the
*same* problem (its float32 inputs cast up, exactly), for dL/dX, dL/dY (learned label logits)
and dL/dbeta, over ``precision_problems`` problems per setting and T: drawn problems (a fresh
ConvNet-3 of ``precision_width``, target = start + 0.01 N(0, 1), N(0, 1) images 3x32x32; with and
without DSA, every DSA family, full batch and minibatches) and expert segments (real images). A
ReLU network's gradient is piecewise smooth, so a float32 error is either rounding (~1e-6) or,
where a pre-activation within rounding of 0 took the other side of the kink in float32 than in
float64, far larger. Each problem therefore also counts those activation sign flips along each
method's float32 student trajectory (``tesla_func.fidelity.activation_sign_flips``; `exact` and
`tesla` compute the states as plain values, `unrolled` inside its differentiable loop, so their
last bits and their flips differ), the errors are split by flips, and settings with
Softplus(beta=20) in place of ReLU are the smooth control. The table gives the medians and the
median over problems of exact's error over unrolled's per setting; ``precision_device="cuda"``
with settings ending in ``/tf32`` measures TF32 on and off (the paper preset).

Writes results/gradient_fidelity/gradient_fidelity.{nc,png,md}, gradient_fidelity_distill.png
(the accuracies), gradient_fidelity_precision.png (float32 errors per problem, by sign flips)
and gradient_fidelity_sets.png (the distilled sets). The default is a reduced protocol (ConvNet
width 32, 3 experts of 6 epochs, 300 evaluation epochs): its accuracies compare the two methods
with each other, not with published numbers. Cost on the 2-core CPU, one thread: part 1 about 8
min, part 2 about 15 min, part 3 about 15 min (17 measured with other jobs sharing the CPU;
``--precision-steps 1 10`` saves a third of it), the experts (shared with main_table) about 15
min once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import seaborn as sns
import torch
import xarray as xr
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from tesla_func.augment import FAMILIES
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
from tesla_func.fidelity import (
    Case,
    activation_sign_flips,
    agreement,
    draw_segment,
    drawn_case,
    expert_case,
    precision_errors,
)
from tesla_func.matching import METHODS as ALL_METHODS
from tesla_func.matching import match_trajectory
from tesla_func.models import ConvNet, ConvNetConfig
from tesla_func.plots import plot_bar, plot_experiment_sets, plot_sweeps, save_png
from tesla_func.plots.style import STYLE
from tesla_func.results import (
    load_results,
    make_results,
    markdown_table,
    percent,
    records_to_results,
)
from tesla_func.sampling import seeded_generator

NAME = "gradient_fidelity"
METHODS = ("tesla", "exact")  # compared; `exact` (= unrolled MTT up to rounding) is the reference
SWEEPS = ("steps", "start_epoch", "lr")  # swept one at a time around the base point
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# the fields of a part-3 setting and their values, in the order they are written
SETTING_CHOICES = {"source": ("drawn", "expert"), "augment": ("none", "all", *FAMILIES),
                   "batch": ("full", "half"), "labels": ("hard", "learned"),
                   "activation": ("relu", "softplus")}


@dataclass(frozen=True)
class PrecisionSetting:
    """One setting of part 3, written "source/augment/batch/labels/activation[/tf32]" (see
    FidelityConfig.precision_settings)."""

    source: str  # drawn | expert
    augment: str  # none | all | a DSA family
    batch: str  # full | half
    labels: str  # hard | learned
    activation: str  # relu | softplus
    tf32: bool = False  # TF32 allowed in float32 convolutions and matmuls (CUDA)

    @classmethod
    def parse(cls, text: str) -> PrecisionSetting:
        parts = text.split("/")
        tf32 = parts[5:] == ["tf32"]
        if len(parts) - tf32 != 5 or any(
                value not in SETTING_CHOICES[name] for name, value in zip(SETTING_CHOICES, parts)):
            raise ValueError(
                f"precision setting {text!r} is not source/augment/batch/labels/activation"
                "[/tf32] with " + "; ".join(f"{k} in {v}" for k, v in SETTING_CHOICES.items()))
        return cls(*parts[:5], tf32=tf32)

    @property
    def families(self) -> tuple[str, ...]:
        """The DSA families drawn from (none: no DSA)."""
        return {"none": (), "all": FAMILIES}.get(self.augment, (self.augment,))


@dataclass(frozen=True)
class FidelityConfig:
    """The three parts of the experiment; the defaults are the small CPU run (about 40 minutes
    with the experts cached)."""

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
    # part 3: precision (about 15 minutes). Each setting is
    # "source/augment/batch/labels/activation[/tf32]":
    # source drawn (a fresh ConvNet-3 of precision_width, target = start + 0.01 N(0, 1), N(0, 1)
    # images 3x32x32) or expert (an expert segment, real images); augment none, all (DSA) or one
    # DSA family; batch full or half (minibatches of half the images); labels hard or learned
    # (label logits); activation relu or softplus (Softplus(beta=20), the smooth control);
    # tf32: TF32 convolutions and matmuls allowed (CUDA only).
    precision_settings: tuple[str, ...] = (
        "drawn/none/full/hard/relu", "drawn/none/half/hard/relu",
        "drawn/all/full/hard/relu", "drawn/all/half/hard/relu",
        *(f"drawn/{family}/half/hard/relu" for family in FAMILIES),
        "drawn/all/half/learned/relu",
        "drawn/none/full/hard/softplus", "drawn/all/half/hard/softplus",
        "expert/none/half/hard/relu", "expert/all/half/hard/relu",
        "expert/all/half/learned/relu",
    )
    precision_steps: tuple[int, ...] = (1, 5, 10)  # T of every problem (its first T batches)
    precision_problems: int = 20  # problems drawn per setting (the `problem` dim)
    precision_width: int = 16  # drawn problems: the ConvNet-3's width
    precision_images: int = 20  # drawn problems: images (expert problems: ipc 2 of 10 classes)
    precision_device: str = "cpu"  # where part 3 runs (float32 and its float64 reference)
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
        for text in self.precision_settings:
            setting = PrecisionSetting.parse(text)
            if setting.tf32 and not self.precision_device.startswith("cuda"):
                raise ValueError(f"precision setting {text!r} asks for TF32, which only CUDA has "
                                 f"(precision_device is {self.precision_device!r})")
        if min((*self.precision_steps, self.precision_problems, self.precision_width)) < 1:
            raise ValueError("precision_steps, precision_problems and precision_width must be >= 1")
        if self.precision_images < 2:
            raise ValueError("precision_images must be >= 2 (a half batch needs one image)")

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
        # part 3 on the GPU, at the paper's batch (100 images 3x32x32, width 128), TF32 off and on
        precision_settings=(*FidelityConfig.precision_settings,
                            *(f"{s}/tf32" for s in FidelityConfig.precision_settings)),
        precision_width=128,
        precision_images=100,
        precision_device="cuda",
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


@contextlib.contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """TF32 in CUDA float32 matmuls and convolutions allowed or not for the block (torch allows
    it in convolutions by default), restored after. No effect on a CPU."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def precision_case(cfg: FidelityConfig, setting: PrecisionSetting, index: int, dataset: Dataset,
                   experts: list[ExpertTrajectory]) -> Case:
    """Problem ``index`` of ``setting`` (float32), drawn from stream (seed, 3, index): the same
    stream for every setting. An expert problem matches expert ``index % experts`` from a start
    epoch drawn uniformly (its target M epochs later)."""
    gen = seeded_generator(cfg.distill.seed, 3, index)
    steps, soft = max(cfg.precision_steps), setting.labels == "learned"
    if setting.source == "drawn":
        n = cfg.precision_images
        arch = ConvNetConfig(channels=3, num_classes=10, image_size=32,
                             width=cfg.precision_width)
        case = drawn_case(gen, arch, images=n, batch=n if setting.batch == "full" else n // 2,
                          steps=steps, families=setting.families, soft_labels=soft,
                          activation=setting.activation)
        return case.to(cfg.precision_device)
    expert = experts[index % len(experts)]
    m = cfg.distill.match_epochs
    start = int(torch.randint(expert.epochs - m + 1, (1,), generator=gen))
    ipc = max(1, cfg.precision_images // dataset.info.num_classes)
    n = ipc * dataset.info.num_classes
    segment = draw_segment(dataset, ipc, n if setting.batch == "full" else n // 2, steps, gen,
                           dsa=bool(setting.families), families=setting.families or FAMILIES)
    case = expert_case(segment, ConvNet(expert.config), expert.params[start],
                       expert.params[start + m], soft_labels=soft,
                       activation=setting.activation, beta=expert.lr, generator=gen)
    return case.to(cfg.precision_device)


def measure_precision(cfg: FidelityConfig, dataset: Dataset,
                      experts: list[ExpertTrajectory]) -> xr.Dataset:
    """Part 3: every method in float32 against the float64 ``unrolled`` gradient of the same
    problem, for every setting, T and problem; and the activation sign flips along each
    method's float32 student trajectory (summed over the first T steps)."""
    settings = [PrecisionSetting.parse(t) for t in cfg.precision_settings]
    steps = sorted(cfg.precision_steps)
    errors, flips = [], []
    bar = tqdm(total=len(settings) * cfg.precision_problems, desc="float32 vs float64",
               unit="problem")
    for text, setting in zip(cfg.precision_settings, settings):
        for index in range(cfg.precision_problems):
            case = precision_case(cfg, setting, index, dataset, experts)
            for t in steps:
                reference = case.solve("unrolled", torch.float64, t)
                key = {"setting": text, "T": t, "problem": index,
                       "precision_loss": float(reference.loss)}
                for method in ALL_METHODS:
                    with tf32(setting.tf32):
                        result = case.solve(method, torch.float32, t)
                    measured = precision_errors(result, reference)
                    errors.append({**key, "precision_method": method,
                                   **{f"precision_{k}": v for k, v in measured.items()}})
            with tf32(setting.tf32):
                counts = activation_sign_flips(case, steps[-1], tuple(ALL_METHODS))
            flips += [{"setting": text, "T": t, "problem": index, "precision_method": method,
                       "precision_flips": int(np.cumsum(counts[method])[t - 1])}
                      for t in steps for method in ALL_METHODS]
            bar.update(1)
    bar.close()
    dims = ["setting", "T", "problem", "precision_method"]
    ds = xr.merge([records_to_results(errors, dims), records_to_results(flips, dims)],
                  join="exact", combine_attrs="drop")
    ds["precision_loss"] = ds.precision_loss.isel(precision_method=0, drop=True)
    ds = ds.reindex({"setting": list(cfg.precision_settings),
                     "precision_method": list(ALL_METHODS)})
    for field in ("source", "augment", "batch", "labels", "activation", "tf32"):
        ds.coords[field] = ("setting", [getattr(s, field) for s in settings])
    return ds


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
    tic = time.perf_counter()
    precision = measure_precision(cfg, dataset, experts)
    precision_seconds = time.perf_counter() - tic
    merged = xr.merge([fidelity, distilled, precision], join="exact", combine_attrs="drop")
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
        seconds_precision=precision_seconds,
        precision_device=cfg.precision_device,
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
    """The sweeps (``png``), the distillation accuracies (``<name>_distill.png``) and the
    float32 errors (``<name>_precision.png``), from ``nc``."""
    plot_sweeps(nc, png, variables=("images_cosine", "images_relative_error", "lr_relative_error"),
                sweeps=SWEEPS, replicate=("segment",),
                title="tesla (two-pass) vs exact gradient: mean +- std over segments")
    plot_bar(nc, png.with_name(f"{png.stem}_distill.png"), var="accuracy", x=None, hue="set",
             replicate=("model", "seed"), title="Distillation: tesla vs exact, same seeds")
    plot_precision(nc, png.with_name(f"{png.stem}_precision.png"))


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
        f"models):\n\n{distill}\n\n{precision_table(ds)}"
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


ABOVE_ROUNDING = 1e-5  # a float32 relative error above this is more than rounding (part 3)


def _at_last_t(ds: xr.Dataset) -> xr.Dataset:
    """Part 3 at its largest T."""
    return ds.sel(T=ds["T"].values.max())


def _median(values: xr.DataArray | np.ndarray) -> float:
    """Median of the finite values (NaN if none)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else float("nan")


def _ratio(ds: xr.Dataset) -> xr.DataArray:
    """Per problem: exact's float32 dL/dX error over unrolled's."""
    error = ds.precision_images_error
    return (error.sel(precision_method="exact", drop=True)
            / error.sel(precision_method="unrolled", drop=True))


def precision_table(ds: xr.Dataset) -> str:
    """Markdown: medians over the problems of every method's float32 errors per setting and T, the
    median ratio exact / unrolled, and the problems whose float32 trajectory flipped a sign; then,
    at the largest T, the errors split by whether the method's own trajectory flipped one."""
    rows = []
    n = ds.sizes["problem"]

    def med(at: xr.Dataset, var: str, *methods: str) -> str:
        values = [_median(at[var].sel(precision_method=m)) for m in methods]
        return " / ".join("-" if np.isnan(v) else f"{v:.1e}" for v in values)

    for setting in ds.setting.values:
        for t in ds["T"].values:
            at = ds.sel(setting=setting, T=t)
            flipped = [int((at.precision_flips.sel(precision_method=m) > 0).sum())
                       for m in ("unrolled", "exact")]
            rows.append([setting, int(t), med(at, "precision_images_error", "unrolled"),
                         med(at, "precision_images_error", "exact"),
                         med(at, "precision_images_error", "tesla"),
                         f"{_median(_ratio(at)):.2f}",
                         med(at, "precision_labels_error", "unrolled", "exact"),
                         med(at, "precision_beta_error", "unrolled", "exact"),
                         f"{flipped[0]} / {flipped[1]} of {n}"])
    errors = markdown_table(
        ["setting", "T", "dL/dX unrolled", "dL/dX exact", "dL/dX tesla",
         "exact / unrolled (median of ratios)", "dL/dY unrolled / exact",
         "dL/dbeta unrolled / exact", "problems with sign flips (unrolled / exact path)"], rows)
    last, split = _at_last_t(ds), []
    for setting in ds.setting.values:
        at, row = last.sel(setting=setting), [setting]
        for method in ("unrolled", "exact"):
            error = at.precision_images_error.sel(precision_method=method).values
            flipped = at.precision_flips.sel(precision_method=method).values > 0
            for part in (~flipped, flipped):
                row.append(f"{_median(error[part]):.1e} ({int(part.sum())})" if part.any()
                           else "- (0)")
        split.append(row)
    by_flips = markdown_table(
        ["setting", "unrolled: no flip", "unrolled: flips", "exact: no flip", "exact: flips"],
        split)
    return (
        f"Float32 against float64, the same problem (relative error of the float32 gradient "
        f"against the float64 `unrolled` one; medians over {n} problems per setting; "
        f"{ds.attrs.get('precision_device', 'cpu')}):\n\n{errors}\n\n"
        f"The dL/dX error at T = {int(last['T'])} split by whether the method's own float32 "
        f"student trajectory flipped the sign of an activation input against float64 (median "
        f"(problems)):\n\n{by_flips}"
    )


def precision_finding(ds: xr.Dataset) -> str:
    """What part 3 says, written from its numbers."""
    ratios = xr.apply_ufunc(_median, _ratio(ds), input_core_dims=[["problem"]], vectorize=True)
    worst = ratios.where(ratios == ratios.max(), drop=True)
    systematic = float(ratios.max()) > 2
    last = _at_last_t(ds)
    t_last = int(last["T"])
    pair = ["unrolled", "exact"]
    relu = last.sel(setting=last.activation == "relu")
    error = relu.precision_images_error.sel(precision_method=pair)
    flipped = relu.precision_flips.sel(precision_method=pair) > 0
    quiet = ~flipped.any("precision_method")
    large = error > ABOVE_ROUNDING
    text = (
        f"**Precision.** The median over problems of exact's float32 dL/dX error over "
        f"unrolled's lies between {float(ratios.min()):.2f} and {float(ratios.max()):.2f} in "
        f"every setting and T (largest at {worst.setting.values[0]}, T = "
        f"{int(worst['T'].values[0])}): "
        + ("above 2: a systematic loss, to be found." if systematic else
           "at most 2 everywhere; `exact` loses no precision systematically.")
    )
    calm = error.where(quiet).values
    calm = calm[np.isfinite(calm)]
    if calm.size:
        text += (
            f" At T = {t_last} with ReLU, the {int(quiet.sum())} problems whose float32 "
            f"student trajectories flipped no activation sign (neither method's) have errors "
            f"of {calm.min():.1e} to {calm.max():.1e} (median ratio "
            f"{_median(_ratio(relu).where(quiet)):.2f}): rounding."
        )
    if relu.sizes["setting"]:
        text += (f" Of the {int(large.sum())} ReLU method results above {ABOVE_ROUNDING:g}, "
                 f"{int((large & flipped).sum())} come from a trajectory that flipped a sign.")
    alone = flipped.sum("precision_method") == 1  # one method's trajectory flipped, not the other
    if int(alone.sum()):
        mine = error.where(flipped).max("precision_method")
        other = error.where(~flipped).max("precision_method")
        only = (flipped & alone).sum("problem")
        text += (
            f" In the {int(alone.sum())} problems where only one method's trajectory flipped "
            f"(exact's in {int(only.sel(precision_method='exact').sum())}, unrolled's in "
            f"{int(only.sel(precision_method='unrolled').sum())}), that method's error is "
            f"{_median((mine / other).where(alone)):.3g} times the "
            f"other's in the median: which method is off is a matter of where its last bits "
            f"put a pre-activation near 0, not of the method."
        )
    smooth = last.sel(setting=last.activation == "softplus")
    if smooth.sizes["setting"]:
        se = smooth.precision_images_error.sel(precision_method=pair)
        n_flips = int((smooth.precision_flips.sel(precision_method=pair) > 0).sum())
        text += (
            f" With Softplus (beta = 20) in place of ReLU (no kink) the errors are "
            f"{_median(se.sel(precision_method='unrolled')):.1e} (unrolled) and "
            f"{_median(se.sel(precision_method='exact')):.1e} (exact) in the median, at most "
            f"{float(se.max()):.1e}, median ratio {_median(_ratio(smooth)):.2f}"
            + (f", although {n_flips} of their trajectories flipped a sign: without a kink a "
               "flip changes nothing." if n_flips else ".")
        )
    first = ds.sel(T=ds["T"].values.min())
    at_first = (first.precision_flips.sel(precision_method="unrolled") > 0).sum("problem")
    if int(at_first.sum()):
        busiest = at_first.sortby(at_first, ascending=False)
        text += (
            f" At T = {int(first['T'])}, where both precisions start from the same state, "
            f"{int(at_first.sum())} problems already flip a sign, most in "
            + ", ".join(f"{s} ({int(n)})" for s, n in zip(busiest.setting.values[:3],
                                                         busiest.values[:3]) if n)
            + ": the float32 forward pass itself rounds a pre-activation across 0."
        )
    r = _ratio(ds)
    top = r.where(r == r.max(), drop=True)
    at = ds.sel(setting=top.setting.values[0], T=top["T"].values[0],
                problem=top.problem.values[0])
    e, f = at.precision_images_error, at.precision_flips
    text += (
        f" The worst single problem ({at.setting.values}, T = {int(at['T'])}, problem "
        f"{int(at.problem)}) has exact {float(e.sel(precision_method='exact')):.1e} against "
        f"unrolled {float(e.sel(precision_method='unrolled')):.1e}, with "
        f"{int(f.sel(precision_method='exact'))} sign flips along exact's trajectory and "
        f"{int(f.sel(precision_method='unrolled'))} along unrolled's."
    )
    if not systematic:
        text += (
            " So the large float32 errors are conditioning, not a defect: a ReLU network's "
            "gradient is piecewise smooth, and float32 rounding moves a few pre-activations "
            "across the kink (the step's gradient and its Hessian terms switch with them); "
            "`exact` computes its first-pass states as plain values and `unrolled` inside its "
            "differentiable loop, so their last bits, and their flips, can differ (at T = "
            f"{t_last}, with ReLU: exact's trajectory flipped in {int(flipped.sel(precision_method='exact').sum())} "
            f"problems, unrolled's in {int(flipped.sel(precision_method='unrolled').sum())})."
        )
    tesla = _median(last.precision_images_error.sel(precision_method="tesla"))
    return text + f" `tesla`'s float32 error is its truncation (median {tesla:.1e} at T = {t_last})."


def plot_precision(nc: Path, png: Path) -> None:
    """Part 3 at its largest T: exact's float32 dL/dX error against unrolled's, one point per
    problem, coloured by which trajectories flipped an activation sign (left); and the ratio
    exact / unrolled per problem, by setting (right)."""
    ds = _at_last_t(load_results(nc))
    error = ds.precision_images_error
    flips = ds.precision_flips > 0
    frame = xr.Dataset({
        "unrolled": error.sel(precision_method="unrolled", drop=True),
        "exact": error.sel(precision_method="exact", drop=True),
        "flip_u": flips.sel(precision_method="unrolled", drop=True),
        "flip_e": flips.sel(precision_method="exact", drop=True),
        "ratio": _ratio(ds),
    }).to_dataframe().reset_index()
    names = {(False, False): "no flip", (True, False): "flips: unrolled's only",
             (False, True): "flips: exact's only", (True, True): "flips: both"}
    frame["sign flips"] = [names[u, e] for u, e in zip(frame.flip_u, frame.flip_e)]
    order = [v for v in names.values() if v in set(frame["sign flips"])]
    with sns.axes_style(STYLE):
        fig = Figure(figsize=(14, 0.32 * ds.sizes["setting"] + 3), layout="constrained")
        left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
        sns.scatterplot(data=frame, x="unrolled", y="exact", hue="sign flips", hue_order=order,
                        style="activation", ax=left, alpha=0.8)
        left.set(xscale="log", yscale="log",
                 xlabel="unrolled: float32 dL/dX relative error",
                 ylabel="exact: float32 dL/dX relative error")
        lo = float(min(frame.unrolled.min(), frame.exact.min())) / 2
        hi = float(max(frame.unrolled.max(), frame.exact.max())) * 2
        for factor, style in ((1, "-"), (2, ":"), (0.5, ":")):
            left.plot([lo, hi], [lo * factor, hi * factor], color="grey", linestyle=style, lw=1)
        left.set_title(f"against the float64 unrolled gradient, T = {int(ds['T'])}")
        sns.stripplot(data=frame, x="ratio", y="setting", hue="sign flips", hue_order=order,
                      ax=right, jitter=0.2, alpha=0.8, legend=False)
        medians = frame.groupby("setting", sort=False)["ratio"].median()
        right.scatter(medians.values, range(len(medians)), marker="|", s=300, color="black",
                      label="median", zorder=3)
        right.set_xscale("log")
        for x in (0.5, 1, 2):
            right.axvline(x, color="grey", linestyle="-" if x == 1 else ":", lw=1)
        right.set(xlabel="exact / unrolled (float32 dL/dX error)", ylabel="")
        right.legend(loc="lower right")
        right.set_title("per problem; the bar is the median")
        fig.suptitle("float32 against float64 on the same problems: rounding, or a ReLU sign flip")
    save_png(fig, png)


def notes(ds: xr.Dataset) -> str:
    """The findings, then where the time went."""
    a = ds.attrs
    return (
        finding(ds) + "\n\n" + precision_finding(ds) + "\n\n"
        f"Wall time: {a['seconds_total'] / 60:.1f} min in all (gradient fidelity "
        f"{a['seconds_fidelity'] / 60:.1f} min, distillation {a['seconds_distill'] / 60:.1f} min "
        f"with {a['runs_reloaded']} runs reloaded from the cache, precision "
        f"{a['seconds_precision'] / 60:.1f} min, experts "
        f"{a['seconds_experts'] / 60:.1f} min: 0 when cached). Accuracies: test accuracy on the "
        "real test set."
    )


if __name__ == "__main__":
    run_experiment(NAME, FidelityConfig, PRESETS, __doc__, main, table, plot=plot, notes=notes,
                   sets=plot_experiment_sets)

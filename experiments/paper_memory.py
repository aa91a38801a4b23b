"""The paper's memory comparison at its own scale, predicted on fake tensors (no GPU, no data).

    python experiments/paper_memory.py            # the paper's sizes; minutes on a CPU
    python experiments/paper_memory.py --steps 10 20 40 --datasets cifar10 imagenet64

(a) CIFAR-100, ConvNet-3 width 128, batch 100, T = 10..80: the iteration peak of `unrolled` (MTT),
    `tesla` and `exact` against T (the paper's Fig. 1a / Table 4).
(b) T = 50 (and T = 10, TESLA's published ImageNet-1K setting), batch 100 on CIFAR-10, CIFAR-100
    (ConvNet-3) and ImageNet-1K (ConvNetD4, 64x64, 1000 classes): the same three methods by
    dataset, and whether each fits a 48 GB card (the paper's Fig. 1b / Table 5).

Every number is tesla_func.planner's prediction (the library's own code run on tensors without
data; on CPU equal to the live-tensor count of a real run, byte for byte). The synthetic set is the
smallest IPC that fills a batch (CIFAR-10: 10, CIFAR-100 and ImageNet-1K: 1); the matching call
does not depend on it. Beside the predictions: a lower bound of what the public TESLA code
(github.com/justincui03/tesla, distill.py) keeps on top of a one-graph-at-a-time method, from
reading it: all T + 1 flat student parameter vectors, every step's indexed batch and its augmented
clone, and every step's label batch (its augmentation graphs, also kept until pass 2, are not
counted). Writes results/paper_memory/paper_memory.{nc,png,md}.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure

from tesla_func.data import shape
from tesla_func.experiment import run_experiment
from tesla_func.memory import format_bytes, parse_bytes
from tesla_func.planner import ANY, PlanConfig, plan
from tesla_func.plots.style import STYLE, long_frame, save_png
from tesla_func.results import load_results, make_results, markdown_table

NAME = "paper_memory"
GIB = 2**30
# The TESLA paper's memory ratios (MTT / TESLA), as the paper reports them (about); its OOM claim
PAPER_RATIO = {"cifar100": "about 5x", "imagenet64": "about 6x"}
PAPER_NOTE = "MTT runs out of memory on a 48 GB card for ImageNet-1K, as the paper reports"


@dataclass(frozen=True)
class PaperMemoryConfig:
    # (a) against T, on `steps_dataset`
    steps: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80)
    steps_dataset: str = "cifar100"
    # (b) by dataset, at each T of `dataset_steps` (the figure shows the largest)
    datasets: tuple[str, ...] = ("cifar10", "cifar100", "imagenet64")
    dataset_steps: tuple[int, ...] = (10, 50)
    methods: tuple[str, ...] = ("unrolled", "tesla", "exact")
    width: int = 128  # ConvNet feature maps
    batch_syn: int = 100  # images per student step
    label_strategy: str = "hard"  # a key of tesla_func.labels.LABEL_STRATEGIES
    dsa: bool = True  # the costliest DSA family on every step
    device_memory: str = "48GiB"  # the paper's 48 GB card
    extrapolate_above: int = 12  # T above this: two short calls extended linearly (exact)
    verify_max_steps: int = 100  # a T limit up to this is checked by a direct prediction
    seed: int = 0
    threads: int = 0  # torch CPU threads on the command-line path; 0 = torch's default


PRESETS = {"paper": PaperMemoryConfig()}  # the default is the paper's scale already


def plan_config(cfg: PaperMemoryConfig, dataset: str, steps: tuple[int, ...],
                **changes) -> PlanConfig:
    """The plan of one dataset: ConvNetD4 for 64x64 images, else ConvNet-3; the smallest IPC
    whose synthetic set fills a batch."""
    s = shape(dataset)
    return PlanConfig(
        dataset=dataset,
        model="convnetd4" if s.image_size == 64 else "convnet",
        width=cfg.width,
        ipc=math.ceil(cfg.batch_syn / s.num_classes),
        batch_syn=cfg.batch_syn,
        syn_steps=steps,
        methods=cfg.methods,
        label_strategy=cfg.label_strategy,
        dsa=cfg.dsa,
        extrapolate_above=cfg.extrapolate_above,
        verify_max_steps=cfg.verify_max_steps,
        seed=cfg.seed,
        **changes,
    )


def public_tesla_extra(p: xr.Dataset, steps: np.ndarray) -> np.ndarray:
    """Bytes the public TESLA code keeps beyond a one-graph method after T steps (lower bound):
    T + 1 flat parameter vectors, T indexed batches and T augmented clones, T label batches."""
    size = 4 if p.attrs["config"]["dtype"] == "float32" else 8
    batch, image = int(p.attrs["batch_syn"]), int(np.prod(p.attrs["image_shape"]))
    labels = 8 if p.attrs["config"]["label_strategy"] == "hard" else p.attrs["num_classes"] * size
    per_step = int(p.attrs["num_params"]) * size + 2 * batch * image * size + batch * labels
    return (steps + 1) * per_step


def main(cfg: PaperMemoryConfig) -> xr.Dataset:
    if list(cfg.methods) != ["unrolled", "tesla", "exact"]:
        raise ValueError(f"paper_memory compares unrolled, tesla and exact, in that order; got "
                         f"methods {list(cfg.methods)}")
    device = parse_bytes(cfg.device_memory)
    a = plan(plan_config(cfg, cfg.steps_dataset, cfg.steps))
    steps = a["steps"].values
    by_dataset = [
        plan(plan_config(cfg, d, cfg.dataset_steps, device_memory=cfg.device_memory,
                         limits=("syn_steps",)))
        for d in cfg.datasets
    ]
    dsteps = by_dataset[0]["steps"].values  # sorted
    at_t = [p.sel(steps=dsteps[-1]) for p in by_dataset]

    def stack(var: str) -> np.ndarray:
        """(dataset, method) at the largest T, or (dataset, method, dataset_steps)."""
        if "steps" in by_dataset[0][var].dims:
            return np.stack([p[var].values for p in by_dataset])
        return np.stack([p[var].values for p in at_t])

    three = ("dataset", "method", "dataset_steps")

    byte = {"units": "bytes"}
    tesla_total = a["total_peak_bytes"].sel({"method": "tesla"}).values
    data = {
        "steps_call_bytes": (("method", "steps"), a["call_peak_bytes"].values, {
            **byte, "long_name": "matching call peak"}),
        "steps_total_bytes": (("method", "steps"), a["total_peak_bytes"].values, {
            **byte, "long_name": "iteration peak"}),
        "steps_flops": (("method", "steps"), a["flops"].values, {"units": "FLOP"}),
        "steps_extrapolated": (("method", "steps"), a["extrapolated"].values, {}),
        "steps_public_tesla_bytes": (("steps",), tesla_total + public_tesla_extra(a, steps), {
            **byte, "long_name": "public TESLA code, lower bound"}),
        "dataset_call_bytes": (three, stack("call_peak_bytes"), byte),
        "dataset_total_bytes": (three, stack("total_peak_bytes"), byte),
        "dataset_flops": (three, stack("flops"), {"units": "FLOP"}),
        "dataset_fits": (three, stack("fits"), {"long_name": f"fits {cfg.device_memory}"}),
        "dataset_max_syn_steps": (("dataset", "method"), stack("max_syn_steps"), {
            "long_name": f"largest T that fits {cfg.device_memory} (inf: any T)"}),
        "dataset_max_syn_steps_verified": (("dataset", "method"),
                                           stack("max_syn_steps_verified"), {}),
        "dataset_public_tesla_bytes": (("dataset", "dataset_steps"), np.stack([
            p["total_peak_bytes"].sel({"method": "tesla"}).values + public_tesla_extra(p, dsteps)
            for p in by_dataset]), {**byte, "long_name": "public TESLA code, lower bound"}),
    }
    return make_results(
        data,
        coords={"method": list(cfg.methods), "steps": steps, "dataset": list(cfg.datasets),
                "dataset_steps": dsteps},
        config=cfg,
        seed=cfg.seed,
        device="cpu",
        kind="predicted (fake tensors)",
        device_bytes=device,
        models=[p.attrs["config"]["model"] for p in by_dataset],
        ipcs=[p.attrs["config"]["ipc"] for p in by_dataset],
        dsa_families=[a.attrs["dsa_family"]] + [p.attrs["dsa_family"] for p in by_dataset],
        num_params=[int(p.attrs["num_params"]) for p in by_dataset],
        steps_title=f"{cfg.steps_dataset}, ConvNet width {cfg.width}, batch {cfg.batch_syn}",
        dataset_title=f"T = {int(dsteps[-1])}, batch {cfg.batch_syn}",
    )


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def table(ds: xr.Dataset) -> str:
    cfg = ds.attrs["config"]
    methods = ds["method"].values.tolist()

    def ratio(num: float, den: float) -> str:
        return f"{num / den:.1f}x"

    rows = []
    for t in ds["steps"].values.tolist():
        at = ds.sel(steps=t)
        total = {m: float(at["steps_total_bytes"].sel({"method": m})) for m in methods}
        flops = {m: float(at["steps_flops"].sel({"method": m})) for m in methods}
        public = float(at["steps_public_tesla_bytes"])
        rows.append([t, *[_gib(total[m]) for m in methods], ratio(total["unrolled"],
                     total["tesla"]), _gib(public), ratio(total["unrolled"], public),
                     f"{flops['tesla'] / flops['unrolled']:.2f}",
                     f"{flops['exact'] / flops['unrolled']:.2f}"])
    part_a = markdown_table(
        ["T", *[f"{m} (GiB)" for m in methods], "unrolled / tesla", "public TESLA code >= (GiB)",
         "unrolled / public TESLA", "FLOPs tesla / unrolled", "FLOPs exact / unrolled"], rows)
    rows = []
    device = format_bytes(ds.attrs["device_bytes"])
    for i, d in enumerate(ds["dataset"].values.tolist()):
        limit = float(ds["dataset_max_syn_steps"].sel({"dataset": d, "method": "unrolled"}))
        checked = bool(ds["dataset_max_syn_steps_verified"].sel({"dataset": d,
                                                                   "method": "unrolled"}))
        limit_text = ("any" if limit == ANY else f"{int(limit)}" + ("" if checked else " (est.)"))
        for t in ds["dataset_steps"].values.tolist():
            at = ds.sel({"dataset": d, "dataset_steps": t})
            total = {m: float(at["dataset_total_bytes"].sel({"method": m})) for m in methods}
            public = float(at["dataset_public_tesla_bytes"])
            fits = "yes" if bool(at["dataset_fits"].sel({"method": "unrolled"})) else "no"
            rows.append([d, f"{ds.attrs['models'][i]}, IPC {ds.attrs['ipcs'][i]}", t,
                         *[_gib(total[m]) for m in methods],
                         ratio(total["unrolled"], total["tesla"]), ratio(total["unrolled"], public),
                         PAPER_RATIO.get(d, "-"), fits, limit_text])
    part_b = markdown_table(
        ["dataset", "model", "T", *[f"{m} (GiB)" for m in methods], "unrolled / tesla",
         "unrolled / public TESLA", "paper (MTT / TESLA)", f"unrolled fits {device}",
         f"largest T for unrolled on {device}"], rows)
    return (
        f"(a) {ds.attrs['steps_title']}: predicted iteration peak\n\n{part_a}\n\n"
        f"(b) batch {cfg['batch_syn']}, by dataset: predicted iteration peak\n\n{part_b}\n\n"
        f"{PAPER_NOTE}. DSA family planned on every step: "
        f"{', '.join(ds.attrs['dsa_families'])}; label strategy {cfg['label_strategy']}."
    )


def plot_memory_plan(
    path: str | Path,
    out_png: str | Path,
    *,
    steps_vars: Sequence[str] = ("steps_total_bytes",),
    dataset_var: str = "dataset_total_bytes",
    reference_vars: Sequence[str] = ("steps_public_tesla_bytes",),
    dataset_reference_var: str | None = "dataset_public_tesla_bytes",
    device_attr: str = "device_bytes",
    title: str | None = None,
) -> Figure:
    """Predicted memory (GiB, log scale): against T, one line per method (black dashed: the
    ``reference_vars`` over steps, e.g. a lower bound of another implementation), and by dataset
    at one T, one bar per method (black marks: ``dataset_reference_var`` over dataset); a dotted
    line at the device memory ``ds.attrs[device_attr]`` if set.

    Reads a file with ``steps_vars`` over (method, steps) and ``dataset_var`` over (dataset,
    method); any further dim of the dataset panel's variables is shown at its last value (e.g.
    the largest T). Panels whose variables are missing are left out.
    """
    ds = load_results(path)
    left = [v for v in steps_vars if v in ds.data_vars]
    refs = [v for v in reference_vars if v in ds.data_vars]
    panels = (["steps"] if left else []) + (["dataset"] if dataset_var in ds.data_vars else [])
    if not panels:
        raise KeyError(f"{path} has none of {[*steps_vars, dataset_var]}; it has "
                       f"{sorted(ds.data_vars)}")
    device = ds.attrs.get(device_attr)
    gib = 2**30
    with sns.axes_style(STYLE):
        fig = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(panels)))
        for ax, panel in zip(axes, panels):
            if panel == "steps":
                for var in left:
                    frame = long_frame(ds[var] / gib, ["method"])
                    sns.lineplot(data=frame, x="steps", y=var, hue="series", marker="o", ax=ax)
                for var in refs:
                    ax.plot(ds["steps"].values, ds[var].values / gib, "k--", marker=".",
                            label=ds[var].attrs.get("long_name", var))
                ax.set_xlabel("T, student steps")
                ax.set_title(ds.attrs.get("steps_title", "against T"), fontsize=10)
            else:
                def last(da: xr.DataArray) -> xr.DataArray:
                    return da.isel({d: -1 for d in da.dims if d not in ("dataset", "method")})

                frame = (last(ds[dataset_var]) / gib).to_dataframe(name="GiB").reset_index()
                sns.barplot(data=frame, x="dataset", y="GiB", hue="method", ax=ax)
                if dataset_reference_var in ds.data_vars:
                    ref = last(ds[dataset_reference_var])
                    ax.scatter(np.arange(ref.sizes["dataset"]), ref.values / gib, marker="_",
                               s=900, color="black", zorder=3,
                               label=ref.attrs.get("long_name", dataset_reference_var))
                ax.set_title(ds.attrs.get("dataset_title", "by dataset"), fontsize=10)
            if device is not None and device > 0:
                ax.axhline(device / gib, color="grey", linestyle=":",
                           label=f"device {device / gib:.0f} GiB")
            ax.set_yscale("log")
            ax.set_ylabel("predicted peak (GiB)")
            ax.legend(fontsize=8)
        if title:
            fig.suptitle(title)
    save_png(fig, out_png)
    return fig


NOTES = (
    "Predicted on fake tensors (tesla_func.planner): iteration peak = the matching call's peak + "
    "what the distillation holds (synthetic set and its momentum, labels, expert start and "
    "target, the model skeleton, the step inputs) + the larger of the SGD update and the SLA "
    "teacher. 'public TESLA code >=' adds to `tesla` what github.com/justincui03/tesla "
    "(distill.py) keeps for all T steps at once: T + 1 flat parameter vectors, every step's "
    "indexed batch and augmented clone and label batch; its augmentation graphs are kept too "
    "and not counted, so it is a lower bound. The paper's ratios are measured GPU memory, "
    "which also holds the CUDA context, cuDNN workspaces and the caching allocator's reserve."
)


if __name__ == "__main__":
    run_experiment(
        NAME,
        PaperMemoryConfig,
        PRESETS,
        __doc__,
        main,
        table,
        notes=NOTES,
        plot=lambda nc, png: plot_memory_plan(
            nc, png, title="Predicted peak memory of one distillation iteration"),
    )

"""The Fashion-MNIST table: random real vs `tesla`, `exact` and `unrolled` (hard labels) at
IPC 1 and 10, each over several distillation seeds, with the published anchors printed beside.

    python experiments/main_table.py                     # CPU default: 3 seeds, IPC 1 and 10
    python experiments/main_table.py --preset full-cpu   # + IPC 50 and tesla/sla (hours)
    python experiments/main_table.py --preset paper      # width 128, 1000-epoch evaluation, GPU
    python experiments/main_table.py --seeds 0 1 2 3 4 --rows tesla/hard exact/hard

Every row is distilled from the same experts, once per seed of ``seeds`` (a seed sets the
initial real images, the expert / start-epoch / minibatch / DSA draws and the evaluation
networks' initialisations), and each set is evaluated in the same protocol (test accuracy on the
real test set after ``eval_epochs``, averaged over ``eval_models`` networks). The table reports
mean +- std ACROSS SEEDS (sample std, ddof 1) of those per-seed numbers; random real is the
seeds' initial images, trained in the same protocol. `unrolled` keeps T step graphs alive; it
runs where ``ipc <= unrolled_max_ipc``.

A seed *collapsed* when its final beta (the learned lr the evaluation trains with) is below
``collapse_below`` times its initial beta (the experts' lr): every method's first update lowers
beta by the clip (exp(-0.5)); a run that keeps falling from there hands the evaluation an lr
too small for its epochs, and its accuracy drops with it.

Cost on the 2-core CPU with 1 thread (distillation 50 iterations of T = 60, 200-epoch
evaluation of 3 networks; measured with other jobs sharing the CPU): an IPC 1 run takes about
1.5-2.2 min, an IPC 10 run 2.6-2.9 min, a pair of baselines 1.2 min, the experts (3 x 6 epochs,
shared with cross_arch and gradient_fidelity) about 15 min once. The default's 18 runs and 6
baselines take about 45-50 min, 60-65 min from scratch. IPC 50 (6-13 min a run) and the SLA row
are in the ``full-cpu`` preset only.

Writes results/main_table/main_table.{nc,png,md}, main_table_beta.png (beta against iteration,
every seed and method) and main_table_sets.png (the seed-0 sets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure

from tesla_func.data import load_dataset
from tesla_func.distill import DistillConfig
from tesla_func.experiment import (
    distill_cached,
    distill_run,
    ensure_experts,
    random_real_baseline,
    run_experiment,
)
from tesla_func.experts import ExpertConfig
from tesla_func.plots import plot_bar, plot_experiment_sets, save_png
from tesla_func.plots.style import STYLE
from tesla_func.results import exceeds_spread, load_results, make_results, markdown_table, spread

NAME = "main_table"

# docs/reference.md section 7: ConvNet-3 width 128, 1000-epoch evaluation (other papers' protocol).
ANCHORS = {
    "fashion-mnist": {
        "random real (published, unverified)": (51.4, 73.8, 82.5),
        "DC (published)": (70.5, 82.3, 83.6),
        "DSA (published)": (70.6, 84.6, 88.7),
    },
    "cifar10": {
        "random real (published)": (15.4, 31.0, 50.6),
        "MTT (published)": (46.3, 65.3, 71.6),
        "TESLA (published)": (48.5, 66.4, 72.6),
    },
}
ANCHOR_IPCS = (1, 10, 50)


@dataclass(frozen=True)
class MainTableConfig:
    # experts (cached under ./cache, shared with the other experiments)
    experts: ExpertConfig = ExpertConfig(dataset="fashion-mnist", num_experts=3, epochs=6, width=32)
    # distillation; method, label strategy, ipc and batch_syn are set per row
    distill: DistillConfig = DistillConfig(
        # 50 keeps the default short on a CPU; 150 (about an hour more) gains 0.9 / 0.1 points
        # at IPC 10 for tesla / exact (measured on all training images, without the validation
        # split)
        iterations=50,
        # Longer student trajectories matched IPC 10 better here (tesla, hard labels, test
        # accuracy after 50 / 100 / 150 iterations): T = 20 79.5 / 78.5 / -, T = 40 80.7 / 80.4 /
        # 81.1, T = 60 80.7 / 81.1 / 81.6
        syn_steps=60,
        match_epochs=2,
        max_start_epoch=4,  # targets up to epoch 5 of the 6 trained
        lr_img=1000.0,
        lr_lr=1.0,
        lr_grad_clip=0.5,
        eval_every=50,  # also evaluate during the run (the log's accuracy-vs-iteration)
        eval_epochs=200,  # evaluation, reduced protocol
        eval_models=3,
    )
    ipcs: tuple[int, ...] = (1, 10)  # images per class; each IPC is a column
    # rows: (method, label strategy); random real is always added
    rows: tuple[str, ...] = ("tesla/hard", "exact/hard", "unrolled/hard")
    seeds: tuple[int, ...] = (0, 1, 2)  # distillation seeds, each a run per row and IPC
    unrolled_max_ipc: int = 10  # skip `unrolled` above this IPC (its memory grows with T)
    batch_syn_max: int = 20  # batch_syn = min(ipc * classes, this)
    # a seed "collapsed" when its final beta is below this times its initial beta
    collapse_below: float = 0.5
    threads: int = 0  # torch CPU threads on the command-line path; 0 = torch's default

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")


PRESETS = {
    "paper": MainTableConfig(
        experts=ExpertConfig(dataset="fashion-mnist", num_experts=20, epochs=50, width=128),
        distill=dataclasses.replace(
            MainTableConfig.distill,
            iterations=5000,
            syn_steps=30,
            max_start_epoch=20,
            eval_every=500,
            eval_epochs=1000,
            eval_models=5,
            device="cuda",
        ),
        ipcs=(1, 10, 50),
        rows=("tesla/hard", "tesla/sla", "exact/hard", "unrolled/hard"),
        batch_syn_max=500,
    ),
    # IPC 50 and the SLA row too, over the seeds: about four hours on the 2-core CPU.
    "full-cpu": MainTableConfig(
        ipcs=(1, 10, 50),
        rows=("tesla/hard", "tesla/sla", "exact/hard", "unrolled/hard"),
    ),
}


def main(cfg: MainTableConfig) -> xr.Dataset:
    base = cfg.distill
    experts_dir = ensure_experts(cfg.experts, device=base.device)
    rows = ("random/real", *cfg.rows)
    shape = (len(rows), len(cfg.ipcs), len(cfg.seeds))
    accuracy, models_std, val = (np.full(shape, np.nan) for _ in range(3))
    beta = np.full((*shape, base.iterations + 1), np.nan)  # iteration 0: the initial beta
    dataset = load_dataset(cfg.experts.dataset)  # loaded once, shared by every run
    sets = {}  # panel title -> synthetic.safetensors of the run (the sets figure: first seed)
    for j, ipc in enumerate(cfg.ipcs):
        for k, seed in enumerate(cfg.seeds):
            distiller = None
            for i, row in enumerate(rows[1:], start=1):
                method, strategy = row.split("/")
                if method == "unrolled" and ipc > cfg.unrolled_max_ipc:
                    continue
                run = distill_run(base, experts_dir, ipc=ipc, batch_syn_max=cfg.batch_syn_max,
                                  num_classes=dataset.info.num_classes, method=method,
                                  label_strategy=strategy, seed=seed)
                distiller = distill_cached(run, dataset)
                evals = distiller.state.evals  # the last one is of the final set
                accuracy[i, j, k] = evals["accuracy_mean"][-1]
                models_std[i, j, k] = evals["accuracy_std"][-1]
                val[i, j, k] = evals["val_accuracy_mean"][-1]
                beta[i, j, k] = [distiller.beta0, *distiller.state.log["lr"]]
                if k == 0:
                    sets[f"{row}, IPC {ipc}"] = str(distiller.out / "synthetic.safetensors")
            # the seed's initial images, trained with the experts' lr in the same protocol
            baseline = random_real_baseline(dataset, ipc, distiller.protocol(lr=distiller.beta0),
                                            seed)
            accuracy[0, j, k], models_std[0, j, k] = baseline.mean, baseline.std
            beta[0, j, k, 0] = distiller.beta0
    initial, final = beta[..., 0], beta[..., -1]
    fraction = {"units": "fraction"}
    return make_results(
        {
            "accuracy": (("row", "ipc", "seed"), accuracy, {**fraction, "long_name":
                         "test accuracy of the seed's set, mean over its evaluation models"}),
            "accuracy_models_std": (("row", "ipc", "seed"), models_std, {
                **fraction, "long_name": "std over the seed's evaluation models"}),
            "val_accuracy": (("row", "ipc", "seed"), val, {**fraction, "long_name":
                             "validation accuracy of the seed's set"}),
            "beta": (("row", "ipc", "seed", "iteration"), beta, {
                "long_name": "learned beta after each iteration (0: initial)"}),
            "collapsed": (("row", "ipc", "seed"),
                          np.where(np.isnan(final) | (np.arange(len(rows)) == 0)[:, None, None],
                                   np.nan, final < cfg.collapse_below * initial),
                          {"long_name": f"final beta < {cfg.collapse_below:g} x initial beta"}),
        },
        coords={"row": list(rows), "ipc": list(cfg.ipcs), "seed": list(cfg.seeds),
                "iteration": np.arange(base.iterations + 1)},
        config=cfg,
        seed=cfg.seeds[0],
        device=base.device,
        experts_dir=str(experts_dir),
        dataset=cfg.experts.dataset,
        synthetic_sets=sets,
        protocol="paper" if cfg == PRESETS["paper"] else "reduced",
    )


def _collapsed(ds: xr.Dataset, row: str, ipc: int) -> str:
    """'k of n collapsed' for a distilled row at an IPC ('' for random real or no runs)."""
    flags = ds.collapsed.sel(row=row, ipc=ipc).values
    flags = flags[np.isfinite(flags)]
    return f"{int(flags.sum())} of {flags.size} collapsed" if flags.size else ""


def table(ds: xr.Dataset) -> str:
    """Markdown: mean +- std across seeds per row and IPC (with how many seeds collapsed), the
    published anchors, then every seed's accuracy and final beta."""
    ipcs = [int(i) for i in ds.ipc.values]
    reduced = ds.attrs.get("protocol") == "reduced"
    header = ["method / labels"] + [f"IPC {i}" for i in ipcs]
    rows = []
    for row in ds.row.values:
        cells = []
        for ipc in ipcs:
            text, collapsed = spread(ds.accuracy.sel(row=row, ipc=ipc)), _collapsed(ds, row, ipc)
            cells.append(f"{text} ({collapsed})" if collapsed and text != "-" else text)
        rows.append([str(row).replace("/", " / ")] + cells)
    for name, values in ANCHORS.get(ds.attrs.get("dataset", ""), {}).items():
        by_ipc = dict(zip(ANCHOR_IPCS, values))
        tag = " [other protocol]" if reduced else ""
        rows.append([name + tag] + [f"{by_ipc[i]:.1f}" if i in by_ipc else "-" for i in ipcs])
    per_seed = []
    for row in ds.row.values:
        for ipc in ipcs:
            at = ds.sel(row=row, ipc=ipc)
            if np.isnan(at.accuracy.values).all():
                continue
            cells = [f"{100 * float(a):.1f}" + ("" if row == "random/real" else
                                                f" (beta {float(b):.2g})")
                     for a, b in zip(at.accuracy.values, at.beta.isel(iteration=-1).values)]
            per_seed.append([str(row).replace("/", " / "), ipc, *cells])
    seeds = [f"seed {int(s)}" for s in ds.seed.values]
    return (markdown_table(header, rows) + "\n\nEvery seed (test accuracy %, final beta):\n\n"
            + markdown_table(["method / labels", "IPC", *seeds], per_seed))


def notes(ds: xr.Dataset) -> str:
    """What the table's numbers are, and which differences exceed the spread across seeds."""
    cfg = ds.attrs["config"]
    n, models = ds.sizes["seed"], cfg["distill"]["eval_models"]
    beta0 = float(ds.beta.isel(iteration=0).sel(row="random/real").values.ravel()[0])
    lines = [(
        f"Test accuracy (%), mean +- std across {n} distillation seeds (sample std, ddof 1) from "
        f"the same experts; each seed's number is its set's accuracy averaged over {models} "
        "evaluation networks; every row in the same protocol; random real is each seed's initial "
        "images trained with the experts' lr. A seed *collapsed* when its final beta (the lr the "
        f"evaluation trains with) is below {cfg['collapse_below']:g} x its initial beta "
        f"({beta0:g}); beta against iteration: main_table_beta.png. The published rows come "
        "from the full protocol."
    )]
    methods = [r for r in ds.row.values if r != "random/real"]
    for ipc in ds.ipc.values:
        pairs = []
        for a in range(len(methods)):
            for b in range(a + 1, len(methods)):
                x, y = (ds.accuracy.sel(row=r, ipc=ipc).values for r in (methods[a], methods[b]))
                if np.isnan(x).all() or np.isnan(y).all():
                    continue
                diff = 100 * (np.nanmean(x) - np.nanmean(y))
                verdict = "exceeds" if exceeds_spread(x, y) else "within"
                pairs.append(f"{methods[a]} - {methods[b]} = {diff:+.1f} ({verdict})")
        if pairs:
            lines.append(f"IPC {int(ipc)}: " + "; ".join(pairs) + ".")
    lines.append("A difference *exceeds* the spread when |mean difference| > the sum of the two "
                 "rows' stds across seeds.")
    return " ".join(lines)


def plot_beta(nc: Path, png: Path) -> Figure:
    """The learned beta against iteration, one line per (method, seed), one panel per IPC, on a
    log axis, with the collapse threshold dashed."""
    ds = load_results(nc)
    cfg = ds.attrs["config"]
    beta = ds.beta.sel(row=[r for r in ds.row.values if r != "random/real"])
    frame = beta.to_dataframe().reset_index().dropna(subset=["beta"])
    frame["seed"] = frame["seed"].astype(str)
    rows = list(beta.row.values)  # coloured as in the accuracy figure, where random real is first
    palette = dict(zip(rows, sns.color_palette(n_colors=len(rows) + 1)[1:]))
    with sns.axes_style(STYLE):
        fig = Figure(figsize=(5.5 * ds.sizes["ipc"], 4.2), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, ds.sizes["ipc"], sharey=True))
        for ax, ipc in zip(axes, ds.ipc.values):
            at = frame[frame.ipc == ipc]
            sns.lineplot(data=at, x="iteration", y="beta", hue="row", style="seed",
                         palette=palette, hue_order=rows, ax=ax, estimator=None,
                         legend=ax is axes[-1])
            beta0 = float(ds.beta.sel(row="random/real", ipc=ipc).isel(iteration=0).values[0])
            ax.axhline(cfg["collapse_below"] * beta0, color="grey", linestyle="--", lw=1)
            ax.set(yscale="log", title=f"IPC {int(ipc)}", xlabel="iteration",
                   ylabel="beta (learned lr)")
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1))
        fig.suptitle(f"Learned beta, every seed and method (dashed: {cfg['collapse_below']:g} x "
                     "the initial beta, below which a run counts as collapsed)")
    save_png(fig, png)
    return fig


def plot(nc: Path, png: Path) -> None:
    """The accuracies (``png``: mean +- std across seeds) and beta against iteration
    (``<name>_beta.png``)."""
    plot_bar(nc, png, hue="row", replicate=("seed",), ddof=1,
             title="Fashion-MNIST: test accuracy, mean +- std across seeds")
    plot_beta(nc, png.with_name(f"{png.stem}_beta.png"))


if __name__ == "__main__":
    run_experiment(NAME, MainTableConfig, PRESETS, __doc__, main, table, notes=notes, plot=plot,
                   sets=plot_experiment_sets)

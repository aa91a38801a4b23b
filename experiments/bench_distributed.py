"""Distillation on several processes: per-rank memory and wall time of one iteration against the
world size, at a fixed total minibatch and T, with and without microbatches.

    python experiments/bench_distributed.py                      # W = 1, 2 on this CPU (gloo)
    python experiments/bench_distributed.py --world-sizes 1 2 4 --microbatch-sizes 0 10 --rounds 5

World size W runs as W processes (W = 1: this process, no process group; W > 1: one spawn of W
gloo processes on this machine, one torch thread each). Every rank builds the same Distiller:
random expert trajectories of a ConvNet and random images stand in for real ones (the cost of an
iteration does not depend on the values), and every student step takes the whole synthetic set
(N = ipc x classes = the total minibatch B), so each rank's rows of a step are exactly its N / W
rows. After a warm-up iteration each rank records

- ``held_bytes``: its shard of the state kept between iterations (images, their momentum, label
  logits and theirs), and ``experts_bytes``: the expert trajectories (every rank holds them all);
- ``peak_bytes``: the live tensor bytes one iteration adds at its peak
  (``tesla_func.measure_peak_memory``: on CPU a deterministic count of live storages);
- ``time_s``: the fastest of ``rounds`` iterations (ranks start each round together).

The table predicts every rank's peak from the memory model of README "Scaling out", with the one
network constant (graph bytes per row) fitted from the two microbatch sizes at W = 1.
Writes results/bench_distributed/bench_distributed.{nc,png,md}.
"""

from __future__ import annotations

import datetime
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import seaborn as sns
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import xarray as xr
from matplotlib.figure import Figure

from tesla_func.data import Dataset, DatasetInfo
from tesla_func.distill import DistillConfig, Distiller
from tesla_func.experiment import run_experiment
from tesla_func.experts import ExpertTrajectory
from tesla_func.memory import measure_peak_memory
from tesla_func.models import ConvNet, ConvNetConfig, init_params
from tesla_func.plots.style import STYLE, save_png, variable
from tesla_func.results import load_results, markdown_table, records_to_results

NAME = "bench_distributed"
MIB = 2**20


@dataclass(frozen=True)
class BenchDistributedConfig:
    world_sizes: tuple[int, ...] = (1, 2)  # W, processes sharing the run
    microbatch_sizes: tuple[int, ...] = (0, 10)  # rows per network pass; 0: whole minibatches
    method: str = "exact"  # gradient method
    label_strategy: str = "hard"  # a key of tesla_func.labels.LABEL_STRATEGIES
    ipc: int = 10  # synthetic images per class; N = ipc x classes = the total minibatch B
    num_classes: int = 10  # K
    channels: int = 3  # C
    image_size: int = 32  # H = W, pixels
    width: int = 32  # ConvNet feature maps (depth 3, instance norm)
    syn_steps: int = 10  # T, student steps per iteration
    num_experts: int = 2  # expert trajectories every rank holds
    expert_epochs: int = 3  # their epochs (E + 1 checkpoints each)
    rounds: int = 3  # timed iterations per point; the fastest is kept
    threads: int = 1  # torch threads per process
    timeout_s: float = 600.0  # process group timeout and the spawn's wall limit, seconds
    seed: int = 0


def _problem(cfg: BenchDistributedConfig) -> tuple[Dataset, list[ExpertTrajectory]]:
    """Random images and expert trajectories of the configured sizes (the same in every rank)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    side, k = cfg.image_size, cfg.num_classes
    info = DatasetInfo(name="random", num_classes=k, channels=cfg.channels, image_size=side,
                       class_names=tuple(str(c) for c in range(k)), mean=(0.0,) * cfg.channels,
                       std=(1.0,) * cfg.channels, zca=False, zca_eps=None, source="random")
    n = cfg.ipc * k
    images = torch.randn(n, cfg.channels, side, side, generator=gen)
    labels = torch.arange(n) % k
    dataset = Dataset(info, images, labels, images[:k], labels[:k])
    arch = ConvNetConfig(channels=cfg.channels, num_classes=k, image_size=side, width=cfg.width)
    experts = []
    for _ in range(cfg.num_experts):
        params = [init_params(ConvNet(arch), gen)]
        for _ in range(cfg.expert_epochs):
            params.append({n: v + 0.01 * torch.randn(v.shape, generator=gen)
                           for n, v in params[-1].items()})
        experts.append(ExpertTrajectory(arch, "random", tuple(params), (0.1,) * len(params),
                                        0.01, {"dataset_info": {"val_per_class": 0}}))
    return dataset, experts


def _distill_config(cfg: BenchDistributedConfig, microbatch: int) -> DistillConfig:
    return DistillConfig(ipc=cfg.ipc, method=cfg.method, label_strategy=cfg.label_strategy,
                         iterations=cfg.rounds + 2, syn_steps=cfg.syn_steps, match_epochs=1,
                         max_start_epoch=cfg.expert_epochs, batch_syn=None,
                         microbatch_size=microbatch or None, seed=cfg.seed)


def _bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def measure_rank(cfg: BenchDistributedConfig, world: int, group: object | None,
                 out: Path) -> list[dict]:
    """This rank's records, one per microbatch size."""
    torch.set_num_threads(cfg.threads)
    rank = 0 if group is None else dist.get_rank(group)
    dataset, experts = _problem(cfg)
    records = []
    for microbatch in cfg.microbatch_sizes:
        distiller = Distiller(_distill_config(cfg, microbatch), out / f"w{world}-m{microbatch}",
                              progress=False, dataset=dataset, experts=experts, group=group)
        distiller.step()  # warm-up: one-off allocations and imports are not the method's cost
        s = distiller.state
        held = _bytes([*s.tensors().values(), *s.momentum.momentum.values()])
        _, peak = measure_peak_memory(distiller.step)
        times, cpus = [], []
        for _ in range(cfg.rounds):
            if group is not None:
                dist.barrier(group)
            wall, cpu = time.perf_counter(), time.process_time()
            distiller.step()
            times.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        records.append({
            "world_size": world, "microbatch": microbatch, "rank": rank,
            "rows": len(s.images), "held_bytes": held, "peak_bytes": peak.peak_bytes,
            "experts_bytes": _bytes(t for e in experts for p in e.params for t in p.values()),
            "time_s": min(times), "cpu_s": min(cpus),
        })
    return records


def _rank_main(rank: int, cfg: BenchDistributedConfig, world: int, folder: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store{world}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=cfg.timeout_s),
    )
    try:
        records = measure_rank(cfg, world, dist.group.WORLD, Path(folder))
        torch.save(records, Path(folder) / f"w{world}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(cfg: BenchDistributedConfig, world: int, folder: str) -> list[dict]:
    context = mp.spawn(_rank_main, args=(cfg, world, folder), nprocs=world, join=False)
    deadline = time.monotonic() + cfg.timeout_s
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{world} ranks did not finish within {cfg.timeout_s} s")
    return [r for rank in range(world)
            for r in torch.load(Path(folder) / f"w{world}-rank{rank}.pt")]


def main(cfg: BenchDistributedConfig) -> xr.Dataset:
    records = []
    with tempfile.TemporaryDirectory() as folder:
        for world in cfg.world_sizes:
            if world == 1:
                records += measure_rank(cfg, 1, None, Path(folder))
            else:
                records += _spawn(cfg, world, folder)
    ds = records_to_results(records, ["world_size", "microbatch", "rank"], config=cfg,
                            seed=cfg.seed, device="cpu", backend="gloo", threads=cfg.threads,
                            load_average=list(_load_average()))
    units = {"held_bytes": "bytes", "peak_bytes": "bytes", "experts_bytes": "bytes",
             "time_s": "s", "cpu_s": "s", "rows": "1"}
    for name, unit in units.items():
        ds[name] = ds[name].astype(np.float64)
        ds[name].attrs["units"] = unit
    ds["microbatch"].attrs["long_name"] = "microbatch_size (0: whole minibatches)"
    return ds


def _load_average() -> tuple[float, ...]:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return ()


def memory_model(ds: xr.Dataset):
    """The peak one iteration adds on a rank, as README "Scaling out" models it, fitted on W = 1:

        peak(W, m) = S / W + g * min(m, B / W) + R

    S: the image gradient of the whole set (N * d * b bytes; a rank's is its shard's), g: the
    graph bytes of one row of a microbatch, R: what does not scale with rows (the stored student
    states of ``exact``, (T + 1) * P * b, and a few parameter vectors). g and R come from the two
    first microbatch sizes at W = 1; returns ``peak(world, microbatch)`` in bytes."""
    cfg = ds.attrs["config"]
    n = cfg["ipc"] * cfg["num_classes"]  # = B: every step takes the whole set
    at = ds.sel(world_size=1, rank=0)
    images = float(at["held_bytes"].isel(microbatch=0)) / 2  # held: images and their momentum
    (m1, p1), (m2, p2) = [(int(m) or n, float(at["peak_bytes"].sel(microbatch=m)))
                          for m in at.microbatch.values[:2]]
    g = (p1 - p2) / (m1 - m2)
    rest = p1 - images - g * m1

    def peak(world: int, microbatch: int) -> float:
        return images / world + g * min(microbatch or n, n // world) + rest

    return peak


def table(ds: xr.Dataset) -> str:
    rows = []
    base = {}
    fitted = 1 in ds.world_size.values and ds.sizes["microbatch"] >= 2
    model = memory_model(ds) if fitted else None
    for world in ds.world_size.values.tolist():
        for micro in ds.microbatch.values.tolist():
            at = ds.sel(world_size=world, microbatch=micro).dropna("rank", how="all")
            total = (at["held_bytes"] + at["peak_bytes"]).max().item()
            time_s = at["time_s"].max().item()
            if world == 1:
                base[micro] = (total, time_s)
            ref_total, ref_time = base.get(micro, (math.nan, math.nan))
            predicted = model(world, micro) if fitted else math.nan
            rows.append([world, micro or "none", int(at["rows"].max()),
                         at["held_bytes"].max().item() / MIB, at["peak_bytes"].max().item() / MIB,
                         predicted / MIB, total / MIB, total / ref_total, time_s,
                         at["cpu_s"].max().item(), ref_time / time_s])
    return markdown_table(
        ["W", "microbatch", "rows per rank", "held (MiB)", "peak added (MiB)",
         "predicted peak (MiB)", "held + peak (MiB)", "vs W=1", "iteration (s)",
         "CPU (s)", "speed-up"], rows)


def notes(ds: xr.Dataset) -> str:
    cfg = ds.attrs["config"]
    experts = float(ds["experts_bytes"].max()) / MIB
    return (
        f"One distillation iteration (`{cfg['method']}`, labels `{cfg['label_strategy']}`) of "
        f"T = {cfg['syn_steps']} student steps, every step on the whole set of "
        f"N = B = {cfg['ipc'] * cfg['num_classes']} images "
        f"{cfg['channels']}x{cfg['image_size']}x{cfg['image_size']}, ConvNet width "
        f"{cfg['width']}, float32. Memory per rank, the largest over the ranks: held = its shard "
        "of the images and their momentum, kept between iterations; peak added = the live "
        "tensor peak one iteration adds (deterministic); predicted = the memory model with g "
        "(graph bytes per row) fitted on W = 1. Every rank also holds the expert trajectories "
        f"({experts:.1f} MiB here), not counted in the table. Time: the slowest rank's fastest "
        f"of {cfg['rounds']} iterations; speed-up = W = 1's time / this time.\n\n"
        "What the times can show on this machine: W ranks are W processes with one torch "
        "thread each on a 2-core CPU shared with other jobs (load average at the start "
        f"{ds.attrs.get('load_average')}), talking through gloo over loopback. CPU (s) is each "
        "rank's own CPU time in an iteration: it shows how the work splits over the ranks (the "
        "rows of every step halve; the per-step all-reduces of a parameter vector and the "
        "parameter-sized work of every rank do not). The wall time falls only where every rank "
        "has a free core: here the two ranks share the 2 cores with the other jobs, and each "
        "collective waits for the slower rank, so the wall-time speed-up measures the machine's "
        "load as much as the method. Nothing here shows more than 2 processes, a network between "
        "nodes (NCCL, InfiniBand) or GPU times."
    )


def plot_distributed(
    path: str | Path,
    out_png: str | Path,
    *,
    x: str = "world_size",
    hue: str = "microbatch",
    title: str | None = None,
) -> Figure:
    """Distillation on several ranks: memory per rank and time per iteration against the world
    size, one bar per microbatch size.

    Reads a file with dims (world_size, microbatch, rank) and variables ``held_bytes`` and
    ``peak_bytes`` (memory: their sum, the largest over the ranks, with the held part hatched)
    and ``time_s`` (the slowest rank's), as experiments/bench_distributed.py writes it.
    """
    ds = load_results(path)
    for name in ("held_bytes", "peak_bytes", "time_s"):
        variable(ds, name, path)
    memory = (ds["held_bytes"] + ds["peak_bytes"]).max("rank") / MIB
    held = ds["held_bytes"].max("rank") / MIB
    time_s = ds["time_s"].max("rank")
    xs, hues = ds[x].values.tolist(), ds[hue].values.tolist()
    names = [str(h) if h else "none" for h in hues]
    palette = sns.color_palette(n_colors=len(hues))
    width = 0.8 / len(hues)
    with sns.axes_style(STYLE):
        fig = Figure(figsize=(10, 4.2), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, (da, label) in zip(axes, ((memory, "memory per rank (MiB)"),
                                          (time_s, "time per iteration (s)"))):
            for j, h in enumerate(hues):
                pos = np.arange(len(xs)) + (j - (len(hues) - 1) / 2) * width
                values = [float(da.sel({x: v, hue: h})) for v in xs]
                ax.bar(pos, values, width * 0.95, color=palette[j], label=names[j])
                if da is memory:
                    ax.bar(pos, [float(held.sel({x: v, hue: h})) for v in xs], width * 0.95,
                           color="none", edgecolor="black", hatch="//", linewidth=0)
            ax.set_xticks(np.arange(len(xs)), [str(v) for v in xs])
            ax.set_xlabel(x.replace("_", " "))
            ax.set_ylabel(label)
            ax.legend(title=hue)
        axes[0].set_title("largest rank: held (hatched) + peak of an iteration")
        axes[1].set_title("slowest rank")
        if title:
            fig.suptitle(title)
    save_png(fig, out_png)
    return fig


if __name__ == "__main__":
    run_experiment(
        NAME, BenchDistributedConfig, {"paper": BenchDistributedConfig(world_sizes=(1, 2, 4))},
        __doc__, main, table,
        plot=plot_distributed, notes=notes,
    )

"""Measuring the scaling benchmarks: the ConvNet matching problem, process RSS in a fresh
subprocess, and the one-call harnesses :func:`scaling_curves` and :func:`keep_graphs_curves`."""

from __future__ import annotations

import ctypes
import gc
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import xarray as xr
from tqdm.auto import tqdm

from tesla_func.benchmarking.config import KEEP_DIM, REFERENCE, ScalingConfig
from tesla_func.benchmarking.report import _at_every_keep, scaling_results
from tesla_func.matching import KEEP_METHODS, METHODS, match_trajectory
from tesla_func.memory import measure_peak_memory, predict_cost
from tesla_func.models import ConvNet, init_params


def matching_args(cfg: ScalingConfig, steps: int) -> dict[str, Any]:
    """Keyword arguments of :func:`~tesla_func.matching.match_trajectory` for a T-step problem.

    Random expert checkpoints (the target a little way along a random direction, as after an epoch
    or two), random images, balanced hard labels, and the whole set as every step's batch. The
    same seed gives the same problem on every call, in every process.
    """
    gen = torch.Generator().manual_seed(cfg.seed)  # drawn on the CPU: the same on every device
    model = ConvNet(channels=cfg.channels, num_classes=cfg.num_classes,
                    image_size=cfg.image_size, width=cfg.width, depth=cfg.depth)
    start = init_params(model, gen)
    target = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    side = cfg.image_size
    images = torch.randn(cfg.num_images, cfg.channels, side, side, generator=gen)
    labels = torch.arange(cfg.num_images) % cfg.num_classes
    device = torch.device(cfg.device)
    return {
        "model": model.to(device),
        "start": {k: v.to(device) for k, v in start.items()},
        "target": {k: v.to(device) for k, v in target.items()},
        "images": images.to(device),
        "labels": labels.to(device),
        "beta": torch.tensor(cfg.lr, device=device),
        "batches": [torch.arange(cfg.num_images, device=device)] * steps,
    }


def synchronize(device: str) -> None:
    """Wait for queued kernels, so that a timer read after a call includes them."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Tensors of a few MB land on the malloc heap, which keeps freed pages: after the T=40
    ``unrolled`` point this process would sit on ~10 GB while the next point's subprocess
    allocates as much again. Called between points, never inside a timed call.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def _proc_status_bytes(key: str) -> int:
    """A ``VmRSS``/``VmHWM``-style line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise KeyError(f"/proc/self/status has no {key}")


def _rss_of_call(cfg: ScalingConfig, method: str, steps: int) -> dict[str, Any]:
    """In *this* process: peak RSS of one matching call above the RSS just before it.

    A one-step call of the same shapes runs first, so that one-off allocations (kernel caches)
    are in the baseline, not in the method's cost; the pages it freed are handed back before the
    baseline is read, so the call pays for every page it touches. The peak is
    reset through /proc/self/clear_refs (Linux); elsewhere ru_maxrss, which never resets, is all
    there is, and the difference to it is only a lower bound.
    """
    torch.set_num_threads(cfg.threads)
    args = matching_args(cfg, steps)
    match_trajectory(**{**args, "batches": args["batches"][:1]}, method=method)
    release_freed_memory()  # the warm-up's freed heap pages would hide the call's own
    try:
        base = _proc_status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        how = "VmHWM after clear_refs"
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        how = "ru_maxrss (lower bound)"
    match_trajectory(**args, method=method)
    if how.startswith("VmHWM"):
        peak = _proc_status_bytes("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return {"rss_bytes": max(peak - base, 0), "rss_peak_bytes": peak, "rss_base_bytes": base,
            "rss_how": how}


def measure_rss(cfg: ScalingConfig, method: str, steps: int, *,
                timeout: float = 1800) -> dict[str, Any]:
    """Process peak RSS of one ``method`` call at T = ``steps``, measured in a fresh subprocess.

    Returns ``rss_bytes`` (peak above the RSS before the call), ``rss_peak_bytes`` (the process
    peak), ``rss_base_bytes`` and ``rss_how``. Raises ``RuntimeError`` with the child's stderr if
    it fails (an out-of-memory kill shows as a negative return code).
    """
    request = json.dumps({"config": cfg.to_dict(), "method": method, "steps": steps})
    proc = subprocess.run([sys.executable, "-m", "tesla_func.benchmarking", request],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS subprocess for {method} at T={steps} failed with code "
                           f"{proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _side_by_side(points: Mapping[Any, Mapping[str, Any]], *, rounds: int, device: str,
                  count_flops: bool = False) -> dict[Any, dict[str, Any]]:
    """Measure each point (key -> the keyword arguments of ``match_trajectory``, method
    included): once under :func:`~tesla_func.memory.measure_peak_memory` (also the warm-up; with
    ``count_flops`` its FLOPs predicted too), then ``rounds`` timed calls, point by point in turn,
    of which the fastest is kept: every point sees the same load. Returns key -> record."""
    records = {}
    for key, kwargs in points.items():
        release_freed_memory()
        result, peak = measure_peak_memory(match_trajectory, **kwargs, device=device)
        records[key] = {"peak_bytes": peak.peak_bytes, "memory_kind": peak.kind,
                        "loss": float(result.loss), "time_s": math.inf, "cpu_s": math.inf}
        if count_flops:
            records[key]["flops"] = predict_cost(match_trajectory, **kwargs)[1].flops
    for _ in range(rounds):
        for key, kwargs in points.items():
            wall, cpu = time.perf_counter(), time.process_time()
            match_trajectory(**kwargs)
            synchronize(device)
            record = records[key]
            record["time_s"] = min(record["time_s"], time.perf_counter() - wall)
            record["cpu_s"] = min(record["cpu_s"], time.process_time() - cpu)
    return records


def scaling_curves(
    make_args: Callable[[int], Mapping[str, Any]] | ScalingConfig,
    *,
    steps: Sequence[int] = (5, 10, 20, 40),
    methods: Sequence[str] = tuple(METHODS),
    rounds: int = 3,
    device: str = "cpu",
    sizes: str = "",
) -> xr.Dataset:
    """Peak memory and wall time of every method at every T, measured side by side.

    ``make_args(T)`` returns the keyword arguments of ``match_trajectory`` (everything but
    ``method``) for a T-step problem; a :class:`ScalingConfig` stands for its ConvNet problem (and
    its steps, rounds and device). At each T, each method runs once under
    :func:`~tesla_func.memory.measure_peak_memory` (also the warm-up), then ``rounds`` timed
    calls, method by method in turn, of which the fastest is kept: the methods see the same load.
    Returns a Dataset over (method, steps) with ``time_s``, ``cpu_s``, ``peak_bytes`` and
    ``loss`` (the same for every method at a T: a sanity check), ready for
    :func:`write_scaling_report`; ``sizes`` describes the problem in its table.
    """
    cfg = None
    if isinstance(make_args, ScalingConfig):
        cfg = make_args
        steps, rounds, device = cfg.steps, cfg.rounds, cfg.device

        def make_args(t: int, cfg: ScalingConfig = cfg) -> dict[str, Any]:
            return matching_args(cfg, t)

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    if rounds < 1 or not steps or min(steps) < 1:
        raise ValueError(f"need rounds >= 1 and T values >= 1, got {rounds} and {steps}")
    records = []
    for t in tqdm(steps, desc="scaling", unit="T"):
        args = dict(make_args(t))
        at_t = _side_by_side({m: {**args, "method": m} for m in methods}, rounds=rounds,
                             device=device)
        records += [{"method": m, "steps": t, **r} for m, r in at_t.items()]
    config = cfg if cfg is not None else {"steps": list(steps), "methods": list(methods),
                                          "rounds": rounds, "device": device}
    kinds = sorted({r["memory_kind"] for r in records})
    ds = scaling_results(records, config, device=device, memory_kind=", ".join(kinds),
                         rounds=rounds, threads=torch.get_num_threads())
    if sizes:
        ds.attrs["sizes"] = sizes
    return ds


def keep_graphs_curves(
    make_args: Callable[[int], Mapping[str, Any]] | ScalingConfig,
    *,
    steps: int = 10,
    keep: Sequence[int] = (0, 2, 5, 10),
    methods: Sequence[str] = KEEP_METHODS,
    rounds: int = 3,
    device: str = "cpu",
    sizes: str = "",
) -> xr.Dataset:
    """Peak memory, wall time and predicted FLOPs of ``tesla`` and ``exact`` against
    ``keep_graphs`` k at one T, with ``unrolled`` at that T as the reference, measured side by
    side.

    ``make_args(T)`` is as for :func:`scaling_curves` (a :class:`ScalingConfig` stands for its
    ConvNet problem at ``keep_steps`` with its ``keep_graphs``, rounds and device). ``unrolled``
    and every point (k, method) run once under :func:`~tesla_func.memory.measure_peak_memory` (and
    have their FLOPs predicted), then ``rounds`` timed calls, point by point in turn; the fastest
    is kept. Returns a Dataset over (method,
    keep_graphs) with ``time_s``, ``cpu_s``, ``peak_bytes``, ``flops`` and ``loss`` (``unrolled``
    ignores k: its one measurement at every k), ready for :func:`write_scaling_report`.
    """
    cfg = None
    if isinstance(make_args, ScalingConfig):
        cfg = make_args
        steps, keep, rounds, device = cfg.keep_steps, cfg.keep_graphs, cfg.rounds, cfg.device

        def make_args(t: int, cfg: ScalingConfig = cfg) -> dict[str, Any]:
            return matching_args(cfg, t)

    unknown = [m for m in methods if m not in KEEP_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods {unknown or list(methods)} take no keep_graphs; those that do: "
                         f"{list(KEEP_METHODS)}")
    if rounds < 1 or steps < 1 or not keep or min(keep) < 0:
        raise ValueError(f"need rounds >= 1, T >= 1 and k values >= 0, got {rounds}, {steps} "
                         f"and {keep}")
    args = dict(make_args(steps))
    points = {(REFERENCE, None): {**args, "method": REFERENCE}}
    points.update({(m, k): {**args, "method": m, "keep_graphs": k} for k in keep for m in methods})
    measured = _side_by_side(points, rounds=rounds, device=device, count_flops=True)
    records = _at_every_keep([{"method": m, KEEP_DIM: k, **r} for (m, k), r in measured.items()],
                             keep)
    config = cfg if cfg is not None else {"steps": steps, "keep_graphs": list(keep),
                                          "methods": list(methods), "rounds": rounds,
                                          "device": device}
    kinds = sorted({r["memory_kind"] for r in records})
    ds = scaling_results(records, config, device=device, dim=KEEP_DIM,
                         memory_kind=", ".join(kinds), rounds=rounds,
                         threads=torch.get_num_threads())
    ds.attrs["steps"] = steps
    if sizes:
        ds.attrs["sizes"] = sizes
    return ds


def main(argv: Sequence[str]) -> None:
    """Subprocess entry of :func:`measure_rss`: one JSON request in, one JSON line out."""
    request = json.loads(argv[0])
    cfg = ScalingConfig(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in request["config"].items()})
    print(json.dumps(_rss_of_call(cfg, request["method"], int(request["steps"]))))

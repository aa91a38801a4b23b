"""Scaling benchmarks: peak memory and wall time against T for every registered method.

    pytest tests/ --benchmark-only  # the issue's sizes; writes results/benchmarks/scaling_<device>.*
    pytest tests/                   # tiny sizes: a smoke test of this code, in seconds

Each point (T, method) runs the method once untimed under :func:`measure_peak_memory` (the
warm-up; on CPU the deterministic peak of live tensor bytes, on CUDA the allocator's peak), then
once timed through pytest-benchmark (pedantic, one round), then, on CPU for T in ``rss_steps``,
once more in a fresh subprocess for the process peak RSS. With ``rounds`` > 1 every method at
that T is then timed again, round by round (unrolled, tesla, exact, unrolled, ...), and the
fastest round is kept: the methods are compared under the same load. Sizes and options:
tests/conftest.py and tesla_func/benchmarking.py. Wall-clock limits are never asserted. What is
deterministic is: every point's loss is finite and its peak positive; every timed round computes
the warm-up's loss again (bitwise on CPU); all methods compute the same loss at a T; and the
memory claims (README's "extra memory" column), once two T of a method are in: on CPU the growth
of ``tesla``'s and ``exact``'s peaks to the byte, in stored parameter vectors (tests/test_memory.py
derives the counts from the code).
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from tesla_func import METHODS, match_trajectory, measure_peak_memory
from tesla_func.benchmarking import (
    MEMORY_GROWTH_TARGET,
    ScalingRun,
    matching_args,
    measure_rss,
    release_freed_memory,
    resolve_config,
    scaling_curves,
    synchronize,
    write_scaling_report,
)
from tesla_func.results import load_results
from tests.test_memory import exact_state_vectors, tesla_state_vectors

pytest.importorskip("pytest_benchmark")


def test_scaling(benchmark, scaling_run: ScalingRun, scaling_point: tuple[int, int, str]) -> None:
    steps, round_, method = scaling_point
    cfg = scaling_run.config
    args = matching_args(cfg, steps)
    if round_ == 0:  # the untimed warm-up, which also measures the memory
        release_freed_memory()  # the previous point's heap
        result, peak = measure_peak_memory(match_trajectory, **args, method=method,
                                           device=cfg.device)
    elif scaling_run.get(method, steps) is None:
        pytest.skip(f"round 1 of {method} at T={steps} did not run")

    times: list[tuple[float, float]] = []  # (wall, CPU) seconds
    losses: list[float] = []

    def timed() -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        timed_result = match_trajectory(**args, method=method)
        synchronize(cfg.device)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
        losses.append(float(timed_result.loss))

    benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0)
    (wall, cpu), = times
    benchmark.extra_info.update(method=method, steps=steps, round=round_ + 1, time_s=wall,
                                cpu_s=cpu, threads=torch.get_num_threads(), width=cfg.width,
                                num_images=cfg.num_images, device=cfg.device)
    assert math.isfinite(wall) and wall > 0 and math.isfinite(cpu) and cpu >= 0
    # The timed call is the warm-up's call again: the same loss, bitwise on CPU (deterministic
    # kernels at a fixed thread count); CUDA's kernels need not be.
    warm_loss = float(result.loss) if round_ == 0 else scaling_run.get(method, steps)["loss"]
    if torch.device(cfg.device).type == "cpu":
        assert losses[0] == warm_loss, (method, steps, round_, losses[0], warm_loss)
    else:
        assert losses[0] == pytest.approx(warm_loss, rel=1e-5), (method, steps, round_)
    if round_ > 0:
        scaling_run.add_round(method, steps, wall, cpu)
        return
    record = {"method": method, "steps": steps, "time_s": wall, "cpu_s": cpu,
              "peak_bytes": peak.peak_bytes, "memory_kind": peak.kind, "loss": float(result.loss)}
    if torch.device(cfg.device).type == "cpu" and steps in cfg.rss_steps:
        release_freed_memory()
        record.update(measure_rss(cfg, method, steps))
    benchmark.extra_info.update(record)
    scaling_run.add(record)

    assert math.isfinite(record["loss"]) and record["peak_bytes"] > 0
    _check_losses_agree(scaling_run, steps)
    state_bytes = sum(v.numel() * v.element_size() for v in args["start"].values())
    _check_memory_claims(scaling_run, method, state_bytes)


def _check_losses_agree(run: ScalingRun, steps: int) -> None:
    """Once every method has run at T: they compute the same loss L (the same student loop; only
    the gradients differ), to float32 rounding."""
    records = [run.get(m, steps) for m in METHODS]
    if any(r is None for r in records):
        return
    losses = {r["method"]: r["loss"] for r in records}
    for loss in losses.values():
        assert loss == pytest.approx(losses["unrolled"], rel=1e-5), (steps, losses)


def _check_memory_claims(run: ScalingRun, method: str, state_bytes: int) -> None:
    """README: ``tesla`` O(graph); ``exact`` O(graph + T params); ``unrolled`` O(T graph).

    On CPU (the live-tensor count, exact to the byte) the peak of ``tesla`` and ``exact`` may
    grow from the smallest T to the largest by exactly the parameter vectors their code keeps
    (tests/test_memory.py): none for ``tesla`` from T = 3, one per step for ``exact``; one vector
    more fails. ``exact``'s ledger starts at T = 2 (at T = 1 its one step has no walk back). The
    CUDA allocator's peak is rounded to blocks and was not calibrated: there the old 10 % bound.
    """
    kind = next(r["memory_kind"] for r in run.records if r["method"] == method)
    done = [t for t in sorted(run.config.steps) if run.get(method, t) is not None]
    if method == "exact" and kind == "live-tensors":
        done = [t for t in done if t >= 2]
    if len(done) < 2:
        return
    lo, hi = done[0], done[-1]
    short, long = run.get(method, lo)["peak_bytes"], run.get(method, hi)["peak_bytes"]
    what = f"{method}: peak {long} B at T={hi} vs {short} B at T={lo} ({state_bytes} B a state)"
    if method in ("tesla", "exact") and kind == "live-tensors":
        ledger = tesla_state_vectors if method == "tesla" else (
            lambda t: exact_state_vectors(t, 1))
        assert long - short == (ledger(hi) - ledger(lo)) * state_bytes, what
    elif method == "tesla":
        assert long <= MEMORY_GROWTH_TARGET * short, what
    elif method == "exact":  # the T stored student states are the only growth allowed
        assert long <= MEMORY_GROWTH_TARGET * short + (hi - lo) * state_bytes, what
    elif method == "unrolled" and hi >= 4 * lo:  # grows with T (linearly: 7.3x from 5 to 40)
        assert long >= 2 * short, what


def test_scaling_report(scaling_run: ScalingRun, tmp_path) -> None:
    """The writer of the session's report (run for real at the end of --benchmark-only)."""
    cfg = scaling_run.config
    missing = [(t, m) for t in cfg.steps for m in METHODS if scaling_run.get(m, t) is None]
    if missing:
        pytest.skip(f"needs every scaling point of this session first; missing {missing}")
    paths = write_scaling_report(scaling_run.dataset(), tmp_path, "scaling")
    ds = load_results(paths["netcdf"])
    assert ds["time_s"].dims == ("method", "steps")
    assert ds["method"].values.tolist() == list(METHODS)
    assert ds["steps"].values.tolist() == sorted(cfg.steps)
    assert ds["time_s"].notnull().all() and (ds["peak_bytes"] > 0).all()
    rss = ds["rss_bytes"].sel(steps=[t for t in cfg.steps if t in cfg.rss_steps])
    assert rss.notnull().all() and (rss >= 0).all()
    for key in ("device", "version_torch", "git_revision", "memory_kind", "session_wall_s"):
        assert key in ds.attrs, key
    assert ds.attrs["width"] == cfg.width and ds.attrs["threads"] == cfg.threads
    assert ds.attrs["config"]["steps"] == list(cfg.steps)
    assert paths["figure"].read_bytes().startswith(b"\x89PNG")
    table = paths["table"].read_text()
    for method in METHODS:
        assert f"| {method} |" in table
    assert "time / unrolled" in table and "peak / unrolled" in table


def test_config_from_options_and_environment() -> None:
    env = {"TESLA_BENCH_WIDTH": "64", "TESLA_BENCH_STEPS": "5 10", "TESLA_BENCH_RSS_STEPS": ""}
    cfg = resolve_config(full=True, overrides={"steps": "5,10,20", "width": None}, environ=env)
    assert (cfg.width, cfg.steps, cfg.rss_steps) == (64, (5, 10, 20), ())  # option beats variable
    assert resolve_config(full=False, environ={}).width < resolve_config(full=True, environ={}).width
    with pytest.raises(ValueError, match="TESLA_BENCH_ROUNDS / --bench-rounds = 'two'"):
        resolve_config(full=True, environ={"TESLA_BENCH_ROUNDS": "two"})


def test_scaling_curves_in_one_call_for_any_problem(tmp_path) -> None:
    """The library's one-call harness on a user's own problem (here the tiny ConvNet one)."""
    cfg = resolve_config(full=False, environ={})
    ds = scaling_curves(lambda t: matching_args(cfg, t), steps=(1, 3), rounds=1,
                        sizes="tiny ConvNet")
    assert ds["peak_bytes"].dims == ("method", "steps")
    assert ds["method"].values.tolist() == list(METHODS)
    assert (ds["time_s"] > 0).all() and (ds["peak_bytes"] > 0).all()
    for steps in (1, 3):  # every method computes the same loss at a T
        losses = ds["loss"].sel(steps=steps).values
        assert losses.max() - losses.min() <= 1e-6 * abs(losses).max(), losses
    unrolled = ds["peak_bytes"].sel({"method": "unrolled"})
    assert unrolled.sel(steps=3) > unrolled.sel(steps=1)  # its graphs pile up with T
    paths = write_scaling_report(ds, tmp_path, "scaling_mine")
    assert "tiny ConvNet" in paths["table"].read_text()
    with pytest.raises(ValueError, match="unknown methods"):
        scaling_curves(lambda t: matching_args(cfg, t), steps=(1,), methods=("adjoint",))

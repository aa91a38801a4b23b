"""Shared pytest set-up.

Benchmarks (tests/test_benchmarks.py, helpers in the package tesla_func/benchmarking/):

- ``pytest tests/ --benchmark-only``: the issue's sizes; at the end of the session the curves are
  written to ``results/benchmarks/scaling_<device>.{nc,png,md}`` (against T) and
  ``results/benchmarks/keep_graphs_<device>.{nc,png,md}`` (against keep_graphs k at one T), the
  throughput (distillation iterations/s and evaluation epochs/s, this tree against the commit
  before the speed-ups) to ``results/benchmarks/throughput_<device>.{nc,png,md}``, and their
  tables are printed;
- ``pytest tests/`` (CI): every point at tiny sizes, a smoke test of the benchmark code.

Sizes are overridable by ``--bench-<field>`` options or ``TESLA_BENCH_<FIELD>`` variables (fields of
:class:`tesla_func.benchmarking.ScalingConfig`), e.g. ``--bench-width 64 --bench-steps 5,10``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tesla_func.benchmarking import (
    ScalingRun,
    ThroughputRun,
    resolve_config,
    throughput_config,
    write_scaling_report,
    write_throughput_report,
)
from tesla_func.provenance import git_revision

_SCALING = pytest.StashKey[ScalingRun]()
_KEEP = pytest.StashKey[ScalingRun]()
_THROUGHPUT = pytest.StashKey[ThroughputRun]()
_OPTIONS = ("device", "width", "num_images", "steps", "rss_steps", "threads", "rounds",
            "keep_steps", "keep_graphs")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tesla_func scaling benchmarks")
    for name in _OPTIONS:
        group.addoption(f"--bench-{name.replace('_', '-')}", default=None,
                        help=f"ScalingConfig.{name} (else $TESLA_BENCH_{name.upper()})")
    group.addoption("--bench-out", default=None,
                    help="folder for scaling_<device>.{nc,png,md} and keep_graphs_<device>.* of a "
                         "--benchmark-only run (else $TESLA_BENCH_OUT, else results/benchmarks)")


def pytest_configure(config: pytest.Config) -> None:
    git_revision()  # the tree's revision as the session starts, before any report is written
    full = bool(config.getoption("benchmark_only", default=False))
    overrides = {name: config.getoption(f"bench_{name}") for name in _OPTIONS}
    bench = resolve_config(full=full, overrides=overrides)
    config.stash[_SCALING] = ScalingRun(bench, full)
    config.stash[_KEEP] = ScalingRun(bench, full, dim="keep_graphs")
    device = overrides["device"] or os.environ.get("TESLA_BENCH_DEVICE") or None
    config.stash[_THROUGHPUT] = ThroughputRun(throughput_config(full=full, device=device), full)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``scaling_point`` = (T, round, method): for each T of the config, round 0 of every
    registered method (memory and warm-up, then timed), then the further timed rounds, method by
    method, so that the methods at one T run side by side (ratios under the same load)."""
    if "scaling_point" in metafunc.fixturenames:
        from tesla_func.matching import METHODS

        cfg = metafunc.config.stash[_SCALING].config
        points = [(t, r, m) for t in cfg.steps for r in range(cfg.rounds) for m in METHODS]
        ids = [f"T{t}-{m}" + (f"-round{r + 1}" if cfg.rounds > 1 else "") for t, r, m in points]
        metafunc.parametrize("scaling_point", points, ids=ids)
    if "keep_point" in metafunc.fixturenames:
        from tesla_func.benchmarking import KEEP_METHODS, REFERENCE

        cfg = metafunc.config.stash[_KEEP].config
        one_round = [(None, REFERENCE)] + [(k, m) for k in cfg.keep_graphs for m in KEEP_METHODS]
        points = [(r, k, m) for r in range(cfg.rounds) for k, m in one_round]
        ids = [("any" if k is None else f"k{k}") + f"-{m}"
               + (f"-round{r + 1}" if cfg.rounds > 1 else "") for r, k, m in points]
        metafunc.parametrize("keep_point", points, ids=ids)


def _with_threads(run: ScalingRun):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(run.config.threads)
    yield run
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def scaling_run(pytestconfig: pytest.Config):
    """The session's :class:`ScalingRun`, with torch's thread count set to its config's."""
    yield from _with_threads(pytestconfig.stash[_SCALING])


@pytest.fixture(scope="session")
def keep_run(pytestconfig: pytest.Config):
    """The session's keep_graphs :class:`ScalingRun` (k at one T), threads as ``scaling_run``."""
    yield from _with_threads(pytestconfig.stash[_KEEP])


@pytest.fixture(scope="session")
def throughput_run(pytestconfig: pytest.Config) -> ThroughputRun:
    """The session's throughput measurement (:class:`tesla_func.benchmarking.ThroughputRun`)."""
    return pytestconfig.stash[_THROUGHPUT]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run torch single-threaded: their networks are tiny, and on a 2-core machine two
    OpenMP threads per process made them up to 10x slower whenever anything else was running.
    (The benchmarks set their own thread count through ``scaling_run``.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_REPORTS = ((_SCALING, "scaling", "scaling benchmark: memory and time against T"),
            (_KEEP, "keep_graphs", "keep_graphs benchmark: memory and time against k at one T"),
            (_THROUGHPUT, "throughput", "throughput: distillation iterations/s and evaluation "
                                        "epochs/s, before and after"))


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = session.config.getoption("bench_out") or os.environ.get("TESLA_BENCH_OUT")
    out = Path(out) if out else session.config.rootpath / "results" / "benchmarks"
    for key, name, _ in _REPORTS:
        run = session.config.stash.get(key, None)
        if run is None or not run.full or not run.records:
            continue  # smoke runs write nothing under results/ (the *_report tests check writers)
        device = run.config.device.split(":")[0]
        write = write_throughput_report if key is _THROUGHPUT else write_scaling_report
        run.report = write(run.dataset(), out, f"{name}_{device}")


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    for key, _, title in _REPORTS:
        run = config.stash.get(key, None)
        paths = run.report if run is not None else None
        if not paths:
            continue
        terminalreporter.section(title)
        terminalreporter.write_line(Path(paths["table"]).read_text())
        terminalreporter.write_line("written: " + ", ".join(str(p) for p in paths.values()))

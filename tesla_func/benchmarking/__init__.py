"""Benchmarks: the gradient methods' peak memory and wall time against T and against
``keep_graphs`` k at one T (the scaling benchmarks), and the distillation's throughput, this tree
against an earlier commit (:mod:`.throughput`).

Modules: :mod:`.config` (sizes and targets), :mod:`.measure` (the problem and its measurements,
the one-call harnesses), :mod:`.report` (the Dataset, tables and files), :mod:`.throughput` and
its subprocess :mod:`.worker`. Every public name is importable from here.

The paper's headline is constant memory in T at a small runtime cost. ``keep_graphs = k`` buys
that cost back with memory (``tesla`` and ``exact`` keep the last k step graphs instead of
rebuilding them; at k = T ``exact`` does the work of ``unrolled``): :func:`keep_graphs_curves`
measures the trade, with ``unrolled`` at the same T as the reference. Two ways in:

- one call, for *your* model and settings: :func:`scaling_curves` takes ``make_args(T)``, a
  function returning the keyword arguments of :func:`~tesla_func.matching.match_trajectory` for a
  T-step problem (or a :class:`ScalingConfig` for the built-in ConvNet problem), measures every
  method at every T side by side, and returns the curves as an xarray Dataset;
  :func:`write_scaling_report` writes them as netCDF, a seaborn figure and a Markdown table::

      from tesla_func.benchmarking import scaling_curves, write_scaling_report
      curves = scaling_curves(lambda T: {**my_args, "batches": my_batches[:T]}, steps=(5, 10, 20))
      write_scaling_report(curves, "results/mine", "scaling_mine")
      kept = keep_graphs_curves(lambda T: {**my_args, "batches": my_batches[:T]}, steps=10,
                                keep=(0, 2, 5, 10))
      write_scaling_report(kept, "results/mine", "keep_graphs_mine")

- ``pytest tests/ --benchmark-only``: ``tests/test_benchmarks.py`` measures one point (method, T),
  or (method, k), per test under pytest-benchmark, with the pieces below:

- :class:`ScalingConfig`: the problem sizes (ConvNet depth 3 on 3x32x32 inputs, a batch of 100
  synthetic images, width 32 on CPU / 128 on CUDA), the T values, and the k values of the
  keep_graphs benchmark and its T, overridable by environment variables ``TESLA_BENCH_<FIELD>``
  (or the pytest options of ``tests/conftest.py``);
- :func:`matching_args`: the problem itself (random expert checkpoints and images, seeded);
- :func:`measure_rss`: the process peak RSS of one call, in a fresh subprocess
  (``python -m tesla_func.benchmarking``), next to the library's deterministic live-tensor count;
- :func:`scaling_results`, :func:`scaling_table`, :func:`keep_graphs_table`,
  :func:`write_scaling_report`: the curves as an xarray Dataset (dims method x steps, or method x
  keep_graphs) saved as netCDF with provenance, a seaborn figure drawn from the saved file, and a
  Markdown table of memory, time (and for k, predicted FLOPs) ratios to ``unrolled``.

- :func:`measure_throughput`, :func:`throughput_results`, :func:`write_throughput_report`:
  distillation iterations/s and evaluation epochs/s at the main job's and the paper's settings,
  before (an earlier commit, ``git archive``) and after, interleaved in one session.

    pytest tests/ --benchmark-only      # full sizes; writes results/benchmarks/scaling_<device>.*,
                                        # keep_graphs_<device>.* and throughput_<device>.*
    pytest tests/                       # tiny sizes, once each: the benchmark code as a smoke test
"""

from tesla_func.benchmarking.config import (
    ENV_PREFIX,
    KEEP_DIM,
    MEMORY_GROWTH_TARGET,
    MIB,
    PEAK_RATIO_TARGET,
    REFERENCE,
    TIME_TARGETS,
    ScalingConfig,
    default_config,
    overridden,
    resolve_config,
)
from tesla_func.benchmarking.measure import (
    keep_graphs_curves,
    main,
    matching_args,
    measure_rss,
    release_freed_memory,
    scaling_curves,
    synchronize,
)
from tesla_func.benchmarking.report import (
    OPTIONAL_VARIABLES,
    VARIABLE_ATTRS,
    ScalingRun,
    keep_graphs_table,
    scaling_results,
    scaling_table,
    write_scaling_report,
)
from tesla_func.benchmarking.throughput import (
    BASELINE,
    SETTINGS,
    Setting,
    ThroughputConfig,
    ThroughputRun,
    baseline_tree,
    measure_throughput,
    plot_throughput,
    run_worker,
    throughput_config,
    throughput_results,
    throughput_table,
    write_throughput_report,
)
from tesla_func.matching import KEEP_METHODS, METHODS  # re-exported, as before

__all__ = [
    "BASELINE", "ENV_PREFIX", "KEEP_DIM", "KEEP_METHODS", "MEMORY_GROWTH_TARGET", "METHODS", "MIB",
    "OPTIONAL_VARIABLES", "PEAK_RATIO_TARGET", "REFERENCE", "SETTINGS", "TIME_TARGETS",
    "VARIABLE_ATTRS", "ScalingConfig", "ScalingRun", "Setting", "ThroughputConfig",
    "ThroughputRun",
    "baseline_tree", "default_config", "keep_graphs_curves", "keep_graphs_table", "main",
    "matching_args", "measure_rss", "measure_throughput", "overridden", "plot_throughput",
    "release_freed_memory", "resolve_config", "run_worker", "scaling_curves", "scaling_results",
    "scaling_table", "synchronize", "throughput_config", "throughput_results", "throughput_table",
    "write_scaling_report", "write_throughput_report",
]

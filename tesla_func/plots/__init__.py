"""Figures drawn from saved files only.

Every ``plot_*`` function takes the path of a netCDF file written by
:func:`tesla_func.results.save_results`, draws with seaborn on a fresh
:class:`matplotlib.figure.Figure` (no pyplot state, no global backend or style change), writes the
PNG atomically and returns the figure. Dims not named as x, hue or style are *replicates*
(``model``, ``seed``, ``repeat``, ...): lines show their mean and a +- 1 std band, bars their mean
+- std (population std, as the accuracy tables report it).

Pictures of synthetic sets (``plot_synthetic``, ``plot_synthetic_sets``, ``plot_experiment_sets``,
``plot_image_strip``; ``set_grid``, the bare pixels for image loggers) are drawn from saved
synthetic-set files in the same way: the images turned back into pixels from the file's own
``dataset_info``.

- :mod:`.figures`: figures of results any experiment or benchmark draws (accuracy, scaling, bars,
  sweeps);
- :mod:`.sets`: pictures of synthetic sets;
- :mod:`.style`: what they share (style, ``save_png``, a variable as a long table).

A figure one experiment alone draws lives in that experiment's script (the label drift in
``experiments/ablate_labels.py``, the memory plan in ``experiments/paper_memory.py``, the
distributed benchmark in ``experiments/bench_distributed.py``), built on :mod:`.style`. A new
general figure is one function in :mod:`.figures` (or :mod:`.sets`) and one name below.
"""

from tesla_func.plots.figures import (
    plot_accuracy_vs_iteration,
    plot_bar,
    plot_scaling,
    plot_sweeps,
)
from tesla_func.plots.sets import (
    plot_experiment_sets,
    plot_image_strip,
    plot_synthetic,
    plot_synthetic_sets,
    set_grid,
)
from tesla_func.plots.style import save_png

__all__ = [
    "plot_accuracy_vs_iteration", "plot_bar", "plot_experiment_sets", "plot_image_strip",
    "plot_scaling", "plot_sweeps", "plot_synthetic", "plot_synthetic_sets", "save_png",
    "set_grid",
]

"""What every figure shares: the seaborn style, the atomic PNG writer, and reading a saved
results file's variables as long tables (also for the figures that live with their
experiments)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import xarray as xr
from matplotlib.figure import Figure

from tesla_func.fileio import atomic_path

STYLE = "whitegrid"  # sns.axes_style of every figure
DPI = 120
MIB = 2**20


def save_png(fig: Figure, out_png: str | Path) -> Path:
    """Write ``fig`` as PNG through a temporary file renamed into place."""
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return out_png


def variable(ds: xr.Dataset, name: str, path: str | Path) -> xr.DataArray:
    """``ds[name]``; a KeyError naming the file and its variables if it has none."""
    if name not in ds.data_vars:
        raise KeyError(f"{path} has no variable {name!r}; it has {sorted(ds.data_vars)}")
    return ds[name]


def long_frame(da: xr.DataArray, keep: Sequence[str]) -> pd.DataFrame:
    """Long table of ``da`` (one row per element, NaN dropped) with a ``series`` column naming
    the combination of the ``keep`` dims ('tesla' or 'method=tesla, labels=soft')."""
    missing = [k for k in keep if k not in da.dims]
    if missing:
        raise KeyError(f"{da.name} has no dims {missing}; its dims are {da.dims}")
    frame = da.to_dataframe(name=da.name).reset_index().dropna(subset=[da.name])
    if not keep:
        frame["series"] = str(da.name)
    elif len(keep) == 1:
        frame["series"] = frame[keep[0]].astype(str)
    else:
        frame["series"] = (
            frame[list(keep)]
            .astype(str)
            .apply(lambda row: ", ".join(f"{k}={v}" for k, v in row.items()), axis=1)
        )
    return frame


def axis_label(da: xr.DataArray, scale: float) -> str:
    """An axis label: the variable's name and units (%, for fractions shown at ``scale`` 100)."""
    units = da.attrs.get("units")
    if scale == 100 and units == "fraction":
        return f"{da.name} (%)"
    return f"{da.name} ({units})" if units else str(da.name)


def percent_scale(da: xr.DataArray) -> float:
    """Fractions are shown as percentages."""
    return 100.0 if da.attrs.get("units") == "fraction" else 1.0


def hue_dims(
    da: xr.DataArray, x: str | None, hue: Sequence[str] | None, replicate: Sequence[str]
) -> list[str]:
    """The dims drawn as separate lines: ``hue`` if given, else every dim but x and the
    replicates."""
    if hue is not None:
        return list(hue)
    return [d for d in da.dims if d != x and d not in replicate]

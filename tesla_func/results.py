"""Results: xarray Datasets with named dims and provenance, saved as netCDF; their tables and files.

Every experiment returns an ``xarray.Dataset`` (called *results* here, to keep "dataset" for image
data) whose dims name what was varied (``method``, ``label_strategy``, ``ipc``, ``model``,
``iteration``, ``seed``, ``steps``, ...) and whose attributes say how it was made: the config
(JSON), the seed, library versions, git revision and device
(:func:`tesla_func.provenance.provenance`). Plots read these files only.
:func:`write_outputs` writes the three files of an experiment: ``.nc``, ``.png`` and ``.md``.

netCDF attributes can hold only strings and numbers, so :func:`save_results` stores any other
attribute value (dicts, lists, bools, None, dataclass configs) as a JSON string and lists those
names in the attribute ``json_attrs``; :func:`load_results` decodes them again, so a dataset
round-trips with ``attrs["config"]`` a dict.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from tesla_func.fileio import atomic_path, atomic_write_text
from tesla_func.provenance import provenance

_JSON_ATTRS = "json_attrs"  # attribute listing which other attributes hold JSON


def netcdf_engine() -> str:
    """'h5netcdf' where its h5py backend is installed, else 'netcdf4'; both write netCDF-4 (HDF5)
    files that either reads."""
    return "h5netcdf" if importlib.util.find_spec("h5py") is not None else "netcdf4"


def to_jsonable(value: Any) -> Any:
    """Dataclass configs -> dicts; everything else as is (json falls back to str())."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def make_results(
    data_vars: Mapping[str, Any],
    coords: Mapping[str, Any] | None = None,
    *,
    config: Any = None,
    seed: int | None = None,
    device: str | None = None,
    **attrs: Any,
) -> xr.Dataset:
    """An ``xr.Dataset(data_vars, coords)`` with the standard attributes.

    data_vars / coords: as for ``xr.Dataset`` (e.g. ``{"accuracy": (("method", "model"), a)}``)
    config:  a dataclass or dict; stored under ``attrs["config"]``
    seed:    the run's root seed; stored under ``attrs["seed"]``
    device:  the device the numbers were measured on (provenance names its model)
    attrs:   anything else worth keeping (stored as given; encoded on save)
    """
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs.update(provenance(device))
    if config is not None:
        ds.attrs["config"] = to_jsonable(config)
    if seed is not None:
        ds.attrs["seed"] = int(seed)
    ds.attrs.update(attrs)
    return ds


def records_to_results(
    records: Iterable[Mapping[str, Any]], dims: Sequence[str], **make_kwargs: Any
) -> xr.Dataset:
    """Flat records (one dict per measurement) -> a Dataset indexed by ``dims``.

    ``records_to_results([{"method": "tesla", "steps": 10, "time_s": 1.2}, ...], ["method",
    "steps"])`` gives ``time_s`` over (method, steps); missing combinations are NaN. The keyword
    arguments go to :func:`make_results` (config, seed, device, attributes).
    """
    frame = pd.DataFrame(list(records))
    if frame.empty:
        raise ValueError("records_to_results got no records")
    missing = [d for d in dims if d not in frame.columns]
    if missing:
        raise ValueError(f"records lack the dims {missing}; they have {list(frame.columns)}")
    if frame.duplicated(subset=list(dims)).any():
        raise ValueError(
            f"several records share the same {list(dims)}: add a dim that tells them apart"
        )
    table = frame.set_index(list(dims)).to_xarray()
    return make_results(dict(table.data_vars), coords=dict(table.coords), **make_kwargs)


def _encode(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out, as_json = {}, []
    for key, value in attrs.items():
        if key == _JSON_ATTRS:
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, str) or (
            isinstance(value, (int, float)) and not isinstance(value, bool)
        ):
            out[key] = value
        else:  # bool, None, dict, list, dataclass, ...: netCDF has no type for these
            out[key] = json.dumps(to_jsonable(value), sort_keys=True, default=str)
            as_json.append(key)
    if as_json:
        out[_JSON_ATTRS] = json.dumps(as_json)
    return out


def _decode(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(attrs)
    for key in json.loads(out.pop(_JSON_ATTRS, "[]")):
        out[key] = json.loads(out[key])
    return out


def save_results(ds: xr.Dataset, path: str | Path) -> Path:
    """Atomically write ``ds`` as netCDF-4 (:func:`netcdf_engine`); non-netCDF attributes are JSON-encoded.

    The dataset passed in is not modified. Returns the path.
    """
    path = Path(path)
    out = ds.copy()
    out.attrs = _encode(ds.attrs)
    for name in out.variables:
        out[name].attrs = _encode(ds[name].attrs)
    with atomic_path(path) as tmp:
        out.to_netcdf(tmp, engine=netcdf_engine())
    return path


def load_results(path: str | Path) -> xr.Dataset:
    """Read a file written by :func:`save_results` fully into memory, JSON attributes decoded.

    Raises ``FileNotFoundError`` naming the path if it is missing and ``ValueError`` naming it if
    it is truncated or not netCDF.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such results file: {path}")
    try:
        ds = xr.load_dataset(path, engine=netcdf_engine())
        ds.attrs = _decode(ds.attrs)
        for name in ds.variables:
            ds[name].attrs = _decode(ds[name].attrs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(
            f"{path} is truncated or not a tesla_func netCDF results file ({type(err).__name__}: {err})"
        ) from err
    return ds



# ----------------------------------------------------------------------------------------------
# Tables and the files of an experiment


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats with 4 significant digits, NaN as '-'."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def percent(mean: float, std: float) -> str:
    """An accuracy fraction pair as the field prints it: '73.2 +- 0.4'."""
    return f"{100 * mean:.1f} +- {100 * std:.1f}"


# ----------------------------------------------------------------------------------------------
# Spread over replicates (distillation seeds, trained networks)


def mean_std(values: Any) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) of the finite ``values``: the spread over
    replicates (distillation seeds, networks) that the tables report. The std is NaN for one
    value (one replicate has no spread), both are NaN for none."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if not values.size:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def spread(values: Any) -> str:
    """Accuracy fractions as '73.2 +- 0.4' (percent, :func:`mean_std`), '73.2 (one run)' for a
    single value and '-' for none."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f} (one run)" if math.isnan(std) else percent(mean, std)


def exceeds_spread(a: Any, b: Any) -> bool:
    """Whether two groups of replicates differ by more than their spread: |mean(a) - mean(b)| >
    std(a) + std(b) (:func:`mean_std`). A plain and conservative rule for three or so seeds,
    where a t-test has little power; False when either group has fewer than two values."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if math.isnan(sa) or math.isnan(sb):
        return False
    return abs(ma - mb) > sa + sb


def command_line() -> str:
    """The command that is running, to be written beside its results, as it was typed:
    ``python -m pytest tests/ --benchmark-only``, not the path ``-m`` resolved to."""
    return " ".join(shlex.quote(a) for a in ["python", *sys.orig_argv[1:]])


def write_outputs(
    ds: xr.Dataset,
    name: str,
    out_dir: Path,
    *,
    plot: Callable[[Path, Path], Any],
    table: str,
    notes: str = "",
) -> dict[str, Path]:
    """Write ``out_dir/<name>.nc`` (with the command that made it), then the figure
    ``<name>.png`` drawn from the saved file by ``plot(nc, png)``, and ``<name>.md``: the
    Markdown ``table`` with the command, git revision and device, and ``notes``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = ds.copy()
    ds.attrs["command"] = command_line()
    nc = save_results(ds, out_dir / f"{name}.nc")
    png = out_dir / f"{name}.png"
    plot(nc, png)
    device = ds.attrs.get("device", "unknown device")
    md = out_dir / f"{name}.md"
    atomic_write_text(
        md,
        f"# {name}\n\nMade by `{ds.attrs['command']}` at git revision "
        f"`{ds.attrs.get('git_revision', 'unknown')}` on {device}.\n\n"
        f"{table}\n\n{notes}".rstrip()
        + "\n",
    )
    return {"netcdf": nc, "figure": png, "table": md}

"""Results as xarray Datasets with named dims and provenance, saved as netCDF.

Every experiment returns an ``xarray.Dataset`` whose dims name what was varied (``method``,
``labels``, ``ipc``, ``model``, ``iteration``, ``seed``, ``steps``, ...) and whose attributes say
how it was made: the config (JSON), the seed, library versions, git revision and device
(:func:`tesla_func.provenance.provenance`). Plots read these files only.

netCDF attributes can hold only strings and numbers, so :func:`save_dataset` stores any other
attribute value (dicts, lists, bools, None, dataclass configs) as a JSON string and lists those
names in the attribute ``json_attrs``; :func:`load_dataset_nc` decodes them again, so a dataset
round-trips with ``attrs["config"]`` a dict.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from tesla_func.fileio import atomic_path
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


def make_dataset(
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


def records_to_dataset(
    records: Iterable[Mapping[str, Any]], dims: Sequence[str], **make_kwargs: Any
) -> xr.Dataset:
    """Flat records (one dict per measurement) -> a Dataset indexed by ``dims``.

    ``records_to_dataset([{"method": "tesla", "steps": 10, "time_s": 1.2}, ...], ["method",
    "steps"])`` gives ``time_s`` over (method, steps); missing combinations are NaN. The keyword
    arguments go to :func:`make_dataset` (config, seed, device, attributes).
    """
    frame = pd.DataFrame(list(records))
    if frame.empty:
        raise ValueError("records_to_dataset got no records")
    missing = [d for d in dims if d not in frame.columns]
    if missing:
        raise ValueError(f"records lack the dims {missing}; they have {list(frame.columns)}")
    if frame.duplicated(subset=list(dims)).any():
        raise ValueError(
            f"several records share the same {list(dims)}: add a dim that tells them apart"
        )
    table = frame.set_index(list(dims)).to_xarray()
    return make_dataset(dict(table.data_vars), coords=dict(table.coords), **make_kwargs)


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


def save_dataset(ds: xr.Dataset, path: str | Path) -> Path:
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


def load_dataset_nc(path: str | Path) -> xr.Dataset:
    """Read a file written by :func:`save_dataset` fully into memory, JSON attributes decoded.

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


open_results = load_dataset_nc

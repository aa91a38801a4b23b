"""Results files (tesla_func.results): netCDF round trip, attributes, errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import tesla_func
from tesla_func.evaluate import EvalConfig
from tesla_func.provenance import git_revision
from tesla_func.results import (
    load_results,
    make_results,
    records_to_results,
    save_results,
)


def _dataset(seed: int = 0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    return make_results(
        {
            "accuracy": (("method", "ipc", "model"), rng.random((2, 3, 4)), {"units": "fraction"}),
            "lr": (("method", "ipc"), rng.random((2, 3)), {"learned": True, "range": [0, 1]}),
        },
        coords={"method": ["mtt", "tesla"], "ipc": [1, 10, 50], "model": np.arange(4)},
        config=EvalConfig(epochs=7, arch_kwargs={"width": 32}),
        seed=seed,
        device="cpu",
        note="a note",
        nothing=None,
        flag=False,
        steps=np.int64(30),
    )


def test_round_trip_keeps_values_coords_and_attributes(tmp_path):
    ds = _dataset()
    back = load_results(save_results(ds, tmp_path / "r.nc"))
    xr.testing.assert_identical(back, ds)
    assert back.attrs["config"] == dataclasses.asdict(
        EvalConfig(epochs=7, arch_kwargs={"width": 32})
    )
    assert back.attrs["seed"] == 0 and back.attrs["nothing"] is None and back.attrs["flag"] is False
    assert back["lr"].attrs == {"learned": True, "range": [0, 1]}
    assert back["method"].values.tolist() == ["mtt", "tesla"]


def test_provenance_attributes_are_present(tmp_path):
    back = load_results(save_results(_dataset(), tmp_path / "r.nc"))
    for key in (
        "git_revision",
        "device",
        "host",
        "created",
        "version_torch",
        "version_xarray",
        "version_python",
    ):
        assert isinstance(back.attrs[key], str) and back.attrs[key], key
    assert back.attrs["device"].startswith("cpu:")


def test_save_leaves_its_input_alone_and_no_temporary_files(tmp_path):
    ds = _dataset()
    save_results(ds, tmp_path / "sub" / "r.nc")
    assert isinstance(ds.attrs["config"], dict) and "json_attrs" not in ds.attrs
    assert os.listdir(tmp_path / "sub") == ["r.nc"]


def test_a_failed_save_keeps_the_old_file(tmp_path):
    good = _dataset(seed=1)  # built once: its provenance carries a "created" time in seconds
    path = save_results(good, tmp_path / "r.nc")
    bad = _dataset().assign(objects=(("method",), np.array([object(), object()], dtype=object)))
    with pytest.raises(ValueError, match="objects"):
        save_results(bad, path)
    xr.testing.assert_identical(load_results(path), good)
    assert os.listdir(tmp_path) == ["r.nc"]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nc"):
        load_results(tmp_path / "nope.nc")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_file_is_a_clear_error(tmp_path, damage):
    path = save_results(_dataset(), tmp_path / "r.nc")
    data = path.read_bytes()
    path.write_bytes(
        {"garbage": b"not netcdf at all" * 10, "truncated": data[: len(data) // 2], "empty": b""}[
            damage
        ]
    )
    with pytest.raises(ValueError, match="r.nc is truncated or not"):
        load_results(path)


def test_records_to_dataset_fills_missing_combinations_with_nan():
    records = [
        {"method": "unrolled", "steps": 5, "time_s": 1.0, "peak_bytes": 100},
        {"method": "unrolled", "steps": 10, "time_s": 2.0, "peak_bytes": 200},
        {"method": "exact", "steps": 5, "time_s": 1.5, "peak_bytes": 50},
    ]
    ds = records_to_results(records, ["method", "steps"], seed=3)
    assert ds["time_s"].dims == ("method", "steps")
    assert ds["time_s"].sel({"method": "unrolled", "steps": 10}) == 2.0
    assert np.isnan(ds["time_s"].sel({"method": "exact", "steps": 10}))
    assert ds.attrs["seed"] == 3 and "git_revision" in ds.attrs


def test_records_to_dataset_rejects_ambiguous_records():
    with pytest.raises(ValueError, match="share the same"):
        records_to_results([{"method": "a", "t": 1.0}, {"method": "a", "t": 2.0}], ["method"])
    with pytest.raises(ValueError, match="lack the dims"):
        records_to_results([{"method": "a", "t": 1.0}], ["steps"])
    with pytest.raises(ValueError, match="no records"):
        records_to_results([], ["steps"])


def test_command_line_is_the_command_as_typed(tmp_path):
    """A module run with ``-m`` is recorded as ``python -m name ...``, not as the path of the
    module's file (which names one machine's site-packages and cannot be rerun as written)."""
    env = {**os.environ, "PYTHONPATH": str(Path(tesla_func.__file__).parents[1])}
    script = "import tesla_func.results as r; print(r.command_line())"
    out = subprocess.run([sys.executable, "-c", script, "--flag", "a b"], capture_output=True,
                         text=True, check=True, env=env).stdout.strip()
    assert out == "python -c '" + script + "' --flag 'a b'"
    (tmp_path / "show_command.py").write_text(script)
    out = subprocess.run([sys.executable, "-m", "show_command", "x"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "python -m show_command x"


def test_committed_results_name_a_clean_revision():
    """Every result file in results/ was made from a committed tree: its revision is a commit,
    never ``-dirty`` or unknown, so its command can be rerun at that commit."""
    files = sorted((Path(__file__).resolve().parents[1] / "results").rglob("*.nc"))
    assert files, "no committed results found"
    for path in files:
        with xr.open_dataset(path) as ds:
            revision = str(ds.attrs.get("git_revision", "unknown"))
        assert revision != "unknown" and not revision.endswith("-dirty"), (path.name, revision)


def test_git_revision_is_taken_once_per_process(tmp_path):
    """A run that rewrites tracked files keeps the revision its tree had when it first asked."""

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "table.md").write_text("old\n")
    git("add", "table.md")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    clean = git_revision(tmp_path)
    assert clean != "unknown" and not clean.endswith("-dirty")
    (tmp_path / "table.md").write_text("new\n")  # the run writes its output
    assert git_revision(tmp_path) == clean

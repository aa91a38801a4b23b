"""The plan as a report: plain JSON-able records (:func:`plan_records`, ``tesla-func plan --format
json``) and Markdown (:func:`plan_markdown`), read from the Dataset :func:`~tesla_func.planner.plan`
returns.

In both, a method whose matching call does not grow with T fits "any" T (``max_syn_steps``); a
method that takes ``keep_graphs`` has ``max_keep_graphs`` in every row, ``null`` (Markdown:
"none") where not even k = 0 fits; a method that takes none has no such key ("-").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from tesla_func.matching import METHODS
from tesla_func.memory import format_bytes
from tesla_func.planner.limits import ANY

if TYPE_CHECKING:  # annotations only: xarray costs 0.6 s at start-up (`tesla-func --help`)
    import xarray as xr


def plan_records(ds: xr.Dataset) -> dict[str, Any]:
    """The plan as plain JSON-able data: ``{"config", "held_bytes", "rows", "limits"}``."""
    rows = []
    for m in ds["method"].values.tolist():
        for t in ds["steps"].values.tolist():
            at = ds.sel({"method": m, "steps": t})
            row = {
                "method": m,
                "steps": int(t),
                "call_peak_bytes": int(at["call_peak_bytes"]),
                "total_peak_bytes": int(at["total_peak_bytes"]),
                "flops": int(at["flops"]),
                "extrapolated": bool(at["extrapolated"]),
            }
            if "fits" in ds:
                row["fits"] = bool(at["fits"])
            if "max_keep_graphs" in ds and METHODS[m].takes_keep_graphs:
                keep = float(at["max_keep_graphs"])  # NaN: not even k = 0 fits
                row["max_keep_graphs"] = None if math.isnan(keep) else int(keep)
                row["max_keep_graphs_verified"] = bool(at["max_keep_graphs_verified"])
                if not math.isnan(keep):
                    row["keep_graphs_total_peak_bytes"] = int(at["keep_graphs_total_peak_bytes"])
                    row["keep_graphs_flops"] = int(at["keep_graphs_flops"])
            rows.append(row)
    limits = []
    if "max_syn_steps" in ds or "max_batch_syn" in ds:
        for m in ds["method"].values.tolist():
            at = ds.sel({"method": m})
            lim: dict[str, Any] = {"method": m}
            if "max_syn_steps" in ds:
                steps = float(at["max_syn_steps"])
                lim["max_syn_steps"] = "any" if steps == ANY else int(steps)
                lim["max_syn_steps_verified"] = bool(at["max_syn_steps_verified"])
            if "max_batch_syn" in ds:
                lim["max_batch_syn"] = int(at["max_batch_syn"])
            limits.append(lim)
    return {
        "config": ds.attrs.get("config"),
        "num_images": int(ds.attrs["num_images"]),
        "batch_syn": int(ds.attrs["batch_syn"]),
        "num_params": int(ds.attrs["num_params"]),
        "dsa_family": ds.attrs["dsa_family"],
        "device_bytes": None if ds.attrs["device_bytes"] < 0 else int(ds.attrs["device_bytes"]),
        "held_bytes": {str(k): int(v) for k, v in zip(ds["item"].values, ds["held_bytes"].values)},
        "step_inputs_bytes": {int(t): int(v) for t, v in zip(ds["steps"].values,
                                                              ds["step_inputs_bytes"].values)},
        "update_peak_bytes": int(ds["update_peak_bytes"]),
        "teacher_peak_bytes": int(ds["teacher_peak_bytes"]),
        "rows": rows,
        "limits": limits,
    }


def _keep_cell(row: dict[str, Any]) -> str:
    """A row's largest keep_graphs: k, the iteration peak and GFLOPs at k (- where the method
    takes no keep_graphs)."""
    if "max_keep_graphs" not in row:
        return "-"
    keep = row["max_keep_graphs"]
    if keep is None:
        return "none"
    estimate = "" if row["max_keep_graphs_verified"] else ", est."
    return (f"{keep} ({format_bytes(row['keep_graphs_total_peak_bytes'])}, "
            f"{row['keep_graphs_flops'] / 1e9:.1f} GFLOPs{estimate})")


def plan_markdown(ds: xr.Dataset) -> str:
    """The plan as Markdown: one row per (method, T), then what is held, then the limits."""
    from tesla_func.results import markdown_table  # where used: results imports xarray (0.6 s)

    rec = plan_records(ds)
    device = rec["device_bytes"]
    header = ["method", "T", "matching call", "iteration peak", "GFLOPs (call)"]
    if device is not None:
        header.append(f"fits {format_bytes(device)}")
    keeps = "max_keep_graphs" in ds
    if keeps:
        header.append("largest keep_graphs")
    rows = []
    for r in rec["rows"]:
        row = [r["method"], f"{r['steps']}" + (" *" if r["extrapolated"] else ""),
               format_bytes(r["call_peak_bytes"]), format_bytes(r["total_peak_bytes"]),
               f"{r['flops'] / 1e9:.1f}"]
        if device is not None:
            row.append("yes" if r["fits"] else "no")
        if keeps:
            row.append(_keep_cell(r))
        rows.append(row)
    cfg = rec["config"]
    lines = [
        (
            f"Plan: {cfg['dataset']}, {cfg['model']} ({rec['num_params']:,} parameters), "
            f"{rec['num_images']} synthetic images ({cfg['ipc']} per class), batch "
            f"{rec['batch_syn']}, label strategy {cfg['label_strategy']}, {cfg['dtype']}, DSA "
            f"family on every step: {rec['dsa_family']}."
        ),
        "",
        markdown_table(header, rows),
        "",
        "Held across the call: " + "; ".join(
            f"{k} {format_bytes(v)}" for k, v in rec["held_bytes"].items() if v
        ) + "; index batches and DSA draws " + ", ".join(
            f"{format_bytes(v)} at T={t}" for t, v in rec["step_inputs_bytes"].items()
        ) + f". SGD update after the call: {format_bytes(rec['update_peak_bytes'])}"
        + (f"; SLA teacher forward: {format_bytes(rec['teacher_peak_bytes'])}"
           if rec["teacher_peak_bytes"] else "") + ".",
    ]
    if any(r["extrapolated"] for r in rec["rows"]):
        lines.append("* extended linearly from two short trajectories (peak and FLOPs are affine "
                     "in T).")
    if keeps:
        lines.append(
            "largest keep_graphs: the most final steps whose graphs the first pass keeps (each "
            "saves a step rebuild, a forward and a backward, for one step graph of memory; "
            "without microbatches k = 1 is the call of k = 0) that still fit, with the "
            "iteration's peak and the call's GFLOPs at that k; est.: read off the line in k, not "
            "checked by predicting the call at k and k + 1 (T above verify_keep_max_steps).")
    if rec["limits"]:
        lines.append("")
        for lim in rec["limits"]:
            parts = []
            if "max_syn_steps" in lim:
                t = lim["max_syn_steps"]
                parts.append(
                    "fits for any T (its peak does not grow with T)" if t == "any"
                    else "does not fit even at T = 1" if t == 0
                    else f"fits for T <= {t}" + ("" if lim["max_syn_steps_verified"]
                                                 else " (linear estimate)"))
            if "max_batch_syn" in lim:
                b = lim["max_batch_syn"]
                whole = " (the whole set)" if b == rec["num_images"] else ""
                parts.append(f"largest batch_syn at T = {max(cfg['syn_steps'])}: "
                             + (f"{b}{whole}" if b else "none"))
            lines.append(f"- `{lim['method']}` on {format_bytes(device)}: " + "; ".join(parts))
    return "\n".join(lines)

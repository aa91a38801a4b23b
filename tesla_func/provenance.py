"""Where a result came from: library versions, git revision, device, host.

Every result file (experts, synthetic sets, xarray results, benchmark curves) carries
:func:`provenance` in its header or attributes so a number can be traced to the code and the
machine that made it.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

_PACKAGES = ("tesla_func", "torch", "numpy", "kornia", "xarray", "safetensors", "scikit-learn")


def versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on ('absent' where not installed)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


_REVISIONS: dict[Path, str] = {}  # checkout folder -> its revision when this process first asked


def git_revision(path: str | Path | None = None) -> str:
    """``git describe --always --dirty`` of the checkout holding this package, or 'unknown'.

    Taken once per process and folder, at the first call: a run that writes tracked result
    files (a benchmark session writes two reports, an experiment its table and figure) would
    otherwise call its own later outputs ``-dirty``. Experiment scripts and the test session
    ask at their start."""
    where = (Path(path) if path is not None else Path(__file__).parent).resolve()
    if where not in _REVISIONS:
        _REVISIONS[where] = _describe(where)
    return _REVISIONS[where]


def _describe(where: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=where, capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def device_name(device: str | torch.device | None = None) -> str:
    """A human name for the device: the GPU model on CUDA, the CPU model and thread count on CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{cpu} ({torch.get_num_threads()} threads)"


def provenance(device: str | torch.device | None = None) -> dict[str, str]:
    """Flat str -> str record for result headers and xarray attributes."""
    info = {f"version_{k}": v for k, v in versions().items()}
    info["git_revision"] = git_revision()
    info["device"] = device_name(device)
    # the instruction set torch's CPU kernels dispatch to: with the thread count in `device`,
    # what decides the last bits of a CPU result
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["host"] = platform.node()
    info["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return info

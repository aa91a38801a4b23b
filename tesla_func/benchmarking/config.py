"""The scaling benchmarks' sizes (:class:`ScalingConfig`), their defaults and overrides, and the
targets the tables check."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

ENV_PREFIX = "TESLA_BENCH_"
REFERENCE = "unrolled"  # every ratio in the table is to this method
KEEP_DIM = "keep_graphs"  # the dim of the keep_graphs benchmark (k at a fixed T)
MIB = 2**20
# The targets, checked in the table (never asserted: wall time on a shared machine is
# noise).
MEMORY_GROWTH_TARGET = 1.10  # constant-memory methods: peak at the largest T / at the smallest
PEAK_RATIO_TARGET = 10.0  # unrolled peak / constant-memory peak at the largest T (CPU, T = 40)
TIME_TARGETS = {"tesla": 1.25, "exact": 1.30}  # constant-memory methods: time / unrolled time


@dataclass(frozen=True)
class ScalingConfig:
    """One scaling benchmark: a ConvNet matching problem and the T values to run it at."""

    device: str = "cpu"
    width: int = 32  # ConvNet feature maps (the paper's 128 is the CUDA default)
    depth: int = 3  # conv blocks
    channels: int = 3  # input channels C
    image_size: int = 32  # input side H = W, pixels
    num_classes: int = 10  # K
    num_images: int = 100  # synthetic images N; every student step takes all of them
    steps: tuple[int, ...] = (5, 10, 20, 40)  # T values, one point per method each
    rss_steps: tuple[int, ...] = (5, 40)  # T values that also get a fresh-subprocess RSS run (CPU)
    # torch intra-op threads, set for the run and recorded. 1 on CPU: on 2 cores shared with
    # other jobs (load 7-9), 2 threads ran every method 4x slower at 4x the CPU time (OpenMP
    # threads spin at barriers waiting for a descheduled sibling). TESLA_BENCH_THREADS=2 when idle.
    threads: int = 1
    rounds: int = 3  # timed calls per point, one per method in turn; the fastest is kept
    lr: float = 0.01  # student learning rate beta
    seed: int = 0
    # The keep_graphs benchmark: time and memory of tesla and exact against k at one T, unrolled
    # at that T as the reference (k = T: exact does unrolled's work and holds its memory).
    keep_steps: int = 10  # its T
    keep_graphs: tuple[int, ...] = (0, 2, 5, 10)  # its k values (final steps whose graphs are kept)

    def __post_init__(self) -> None:
        for name in ("width", "depth", "channels", "image_size", "num_classes", "num_images",
                     "threads", "rounds", "keep_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ScalingConfig.{name} must be an int >= 1, got {value!r}")
        if not self.steps or any(t < 1 for t in self.steps):
            raise ValueError(f"ScalingConfig.steps must be T values >= 1, got {self.steps!r}")
        if any(k < 0 for k in self.keep_graphs):
            raise ValueError(f"ScalingConfig.keep_graphs must be k values >= 0, got "
                             f"{self.keep_graphs!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_config(device: str | None = None, *, full: bool = True) -> ScalingConfig:
    """The issue's sizes on ``device`` (default: CUDA if present), or tiny ones for a smoke run.

    Full, CPU: width 32, T in (5, 10, 20, 40), RSS at the smallest and largest T.
    Full, CUDA: width 128, T up to 80 (RSS is a CPU measurement only).
    Smoke (``full=False``): width 4, 8 images of 3x16x16, T in (1, 2, 4), keep_graphs k in
    (0, 2, 4) at T = 4: seconds, not minutes.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not full:
        return ScalingConfig(device=device, width=4, image_size=16, num_images=8, steps=(1, 2, 4),
                             rss_steps=(4,) if device == "cpu" else (), keep_steps=4,
                             keep_graphs=(0, 2, 4))
    if torch.device(device).type == "cuda":
        return ScalingConfig(device=device, width=128, steps=(5, 10, 20, 40, 80), rss_steps=())
    return ScalingConfig(device=device)


def resolve_config(*, full: bool, overrides: Mapping[str, str | None] | None = None,
                   environ: Mapping[str, str] | None = None) -> ScalingConfig:
    """:func:`default_config` with per-field overrides from ``overrides`` (e.g. pytest options;
    None = not given), else from ``TESLA_BENCH_<FIELD>`` environment variables.

    Values are strings as typed: ``"64"``, ``"5,10,20"`` (tuples), ``"cuda"``; an empty string
    gives an empty tuple (``TESLA_BENCH_RSS_STEPS=`` turns the RSS runs off).
    """
    environ = os.environ if environ is None else environ
    fields = dataclasses.fields(ScalingConfig)
    given = {f.name: environ.get(ENV_PREFIX + f.name.upper()) for f in fields}
    given.update({k: v for k, v in (overrides or {}).items() if v is not None})
    base = default_config(given.pop("device", None) or None, full=full)
    return overridden(base, given, ENV_PREFIX, flags="--bench-")


Config = TypeVar("Config")


def overridden(base: Config, given: Mapping[str, str | None], prefix: str,
               flags: str | None = None) -> Config:
    """``base`` (a config dataclass) with the fields in ``given`` (text as typed; None: not
    given) parsed by the type of the field's value in ``base``: ``"64"``, ``"5,10,20"`` or
    ``"a b"`` (tuples: of ints, or of words for a tuple of words), ``"cuda"``. A bad value raises
    ValueError naming the variable (``prefix`` + FIELD) and the flag (``flags`` + field)."""
    changes = {}
    for field in dataclasses.fields(base):
        text = given.get(field.name)
        if text is None:
            continue
        default = getattr(base, field.name)
        try:
            if isinstance(default, tuple):
                words = text.replace(",", " ").split()
                kind = type(default[0]) if default else int
                changes[field.name] = tuple(kind(t) for t in words)
            else:
                changes[field.name] = type(default)(text)
        except ValueError as err:
            flag = f" / {flags}{field.name.replace('_', '-')}" if flags else ""
            raise ValueError(f"{prefix}{field.name.upper()}{flag} = {text!r} is not a valid "
                             f"{type(default).__name__}: {err}") from err
    return dataclasses.replace(base, **changes)

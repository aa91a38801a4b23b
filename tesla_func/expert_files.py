"""Expert files: the stored trajectory of one expert, its path, and reading it back checked.

On disk, one file per expert, ``<out>/expert_007.safetensors``, written atomically once the expert
is finished (:func:`tesla_func.fileio.save_tensors`):

- tensors ``epoch_000/<param name>`` ... ``epoch_<E>/<param name>`` (epoch 0 = the initial
  weights; names as in ``ConvNet.named_parameters()``, e.g. ``epoch_003/features.0.weight``);
- JSON header: ``format`` ("tesla_func.expert"), ``format_version``, ``architecture``
  (ConvNetConfig dict), ``dataset``, ``dataset_info`` (normalisation, ZCA, class names, source),
  ``expert_config``, ``expert_index``, ``seed`` (base seed; the expert's streams come from
  (seed, index)), ``lr``, ``epochs``, ``test_accuracy`` (E + 1 values, index 0 = at init),
  ``seconds_per_epoch``, ``provenance`` (library versions, git revision, device), ``defaults``
  (the fields the dataset's defaults set, and why), ``warnings``.

A file is read back with its architecture, keys and shapes checked (:func:`load_expert`); a folder
of them is one architecture on one dataset (:func:`load_experts`). Training them is
:mod:`tesla_func.experts`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from tesla_func.fileio import load_tensors
from tesla_func.models import ConvNet, ConvNetConfig

FORMAT = "tesla_func.expert"
FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class ExpertTrajectory:
    """One trained expert: its weights after every epoch (index 0 = initial weights)."""

    config: ConvNetConfig
    dataset: str
    params: tuple[dict[str, Tensor], ...]  # E + 1 dicts name -> tensor
    test_accuracy: tuple[float, ...]  # E + 1 fractions in [0, 1], index 0 = at init
    lr: float  # the SGD learning rate the expert was trained with
    header: Mapping[str, Any]  # the file's whole JSON header
    path: Path | None = None

    @property
    def epochs(self) -> int:
        return len(self.params) - 1

    @property
    def batch_size(self) -> int:
        """The real images of each of the expert's SGD steps (files that do not say: 256)."""
        return int(self.header.get("expert_config", {}).get("batch_size", 256))

    def to(self, device: torch.device | str) -> ExpertTrajectory:
        moved = tuple({k: t.to(device) for k, t in p.items()} for p in self.params)
        return dataclasses.replace(self, params=moved)


def expert_path(out_dir: str | Path, index: int) -> Path:
    return Path(out_dir) / f"expert_{index:03d}.safetensors"


def param_key(epoch: int, name: str) -> str:
    return f"epoch_{epoch:03d}/{name}"


def skeleton(arch: ConvNetConfig) -> ConvNet:
    """A ConvNet whose weights will be overwritten, built without touching the caller's RNG.

    nn.Conv2d / nn.Linear draw their default init from the global RNG; it is forked here so that
    nothing outside this module notices (house rule: explicit generators only).
    """
    with torch.random.fork_rng(devices=[]):
        return ConvNet(arch)


def read_header(path: Path) -> dict:
    """The JSON header of a file written by save_tensors, without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get("header", "{}"))
    except Exception as err:  # safetensors raises its own error types for broken files
        raise ValueError(
            f"{path} is truncated or not a tesla_func file ({err}); delete it and run again"
        ) from err


def diff_fields(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(found) | set(expected))
    return [
        f"{k}: file has {found.get(k, '(missing)')!r}, expected {expected.get(k, '(missing)')!r}"
        for k in keys
        if found.get(k) != expected.get(k)
    ]




def load_expert(
    path: str | Path,
    expect_config: ConvNetConfig | None = None,
    expect_dataset: str | None = None,
) -> ExpertTrajectory:
    """Read one expert file, checking its architecture, keys and shapes.

    Raises:
        FileNotFoundError: no such file.
        ValueError: truncated/corrupt file, another architecture or dataset than expected, or
            tensors missing / extra / of the wrong shape (each one named).
    """
    path = Path(path)
    tensors, header = load_tensors(path)
    if header.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a tesla_func expert file (format {header.get('format')!r})"
        )
    try:
        arch = ConvNetConfig(**header["architecture"])
        epochs = int(header["epochs"])
        accuracy = tuple(float(a) for a in header["test_accuracy"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} has a broken header ({err!r})") from err
    if expect_config is not None and arch != expect_config:
        problems = diff_fields(arch.to_dict(), expect_config.to_dict())
        raise ValueError(f"{path} holds another architecture: {'; '.join(problems)}")
    if expect_dataset is not None and header.get("dataset") != expect_dataset:
        raise ValueError(
            f"{path} was trained on {header.get('dataset')!r}, expected {expect_dataset!r}"
        )
    shapes = {n: tuple(p.shape) for n, p in skeleton(arch).named_parameters()}
    expected = {param_key(e, n): s for e in range(epochs + 1) for n, s in shapes.items()}
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [
        f"{k} has shape {tuple(tensors[k].shape)}, the architecture needs {s}"
        for k, s in expected.items()
        if k in tensors and tuple(tensors[k].shape) != s
    ]
    if len(accuracy) != epochs + 1:
        problems.append(
            f"{len(accuracy)} test accuracies for {epochs} epochs (expected {epochs + 1})"
        )
    if problems:
        shown = "; ".join(problems[:10]) + (
            f"; ... {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        raise ValueError(f"{path} does not match its architecture {arch}: {shown}")
    params = tuple({n: tensors[param_key(e, n)] for n in shapes} for e in range(epochs + 1))
    return ExpertTrajectory(
        config=arch,
        dataset=str(header.get("dataset")),
        params=params,
        test_accuracy=accuracy,
        lr=float(header["lr"]),
        header=header,
        path=path,
    )


def load_experts(
    directory: str | Path,
    expect_config: ConvNetConfig | None = None,
    expect_dataset: str | None = None,
) -> list[ExpertTrajectory]:
    """Every finished expert in ``directory`` (``expert_*.safetensors``), in index order.

    Without ``expect_config`` / ``expect_dataset`` the first expert's are expected of all the
    others, so the list is always one architecture on one dataset.
    """
    directory = Path(directory)
    paths = sorted(directory.glob("expert_*.safetensors"))
    if not paths:
        raise FileNotFoundError(
            f"no expert files (expert_*.safetensors) in {directory}; train some with "
            f"`tesla-func experts --dataset NAME --out {directory}`"
        )
    experts = []
    for path in paths:
        expert = load_expert(path, expect_config, expect_dataset)
        expect_config, expect_dataset = expert.config, expert.dataset
        experts.append(expert)
    return experts

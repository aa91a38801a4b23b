"""Types shared across the package, defined once so that a name means one thing everywhere.

``Params``
    parameters (or anything shaped like them: gradients, momenta, Hessian-vector products) as a
    name -> tensor dict, the keys of ``model.named_parameters()``.
``StepAugment``
    the augmentation of the matching call: ``(x, step) -> x`` applies the transform drawn for
    student step ``step``, the same one every time it is called (the two-pass and adjoint methods
    call it twice per step). :meth:`tesla_func.augment.DSA.replayable` makes one.
``RowAugment``
    a ``StepAugment`` that can also augment *part* of a step's minibatch, as a split step needs
    (``microbatch_size``, or ``group`` where each rank holds some rows):
    ``augment(x, step, rows=rows)`` applies to the n rows of ``x`` the transforms drawn for
    positions ``rows`` (n,) of step ``step``'s whole minibatch, so every row gets the same
    transform whether its minibatch is split or not. ``augment(x, step)`` still means the whole
    minibatch. Detected by :func:`accepts_rows` (a parameter named ``rows``).
    :class:`tesla_func.augment.ReplayedDSA` is one.
``RandomAugment``
    the augmentation of ordinary training (experts, evaluation): ``(x, generator) -> x`` draws a
    fresh transform from ``generator`` on every call. A :class:`tesla_func.augment.DSA` is one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

Params = dict[str, Tensor]
StepAugment = Callable[[Tensor, int], Tensor]


class RowAugment(Protocol):
    """``augment(x, step, rows=None) -> x``: the transforms of step ``step``, of rows ``rows``."""

    def __call__(self, x: Tensor, step: int, *, rows: Tensor | None = None) -> Tensor: ...


def accepts_rows(augment: Callable) -> bool:
    """Whether ``augment`` follows :class:`RowAugment`: it takes a keyword argument ``rows``."""
    try:
        parameter = inspect.signature(augment).parameters.get("rows")
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return False
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )

RandomAugment = Callable[[Tensor, torch.Generator], Tensor]

"""Types shared across the package, defined once so that a name means one thing everywhere.

``Params``
    parameters (or anything shaped like them: gradients, momenta, Hessian-vector products) as a
    name -> tensor dict, the keys of ``model.named_parameters()``.
``StepAugment``
    the augmentation of the matching call: ``(x, step) -> x`` applies the transform drawn for
    student step ``step``, the same one every time it is called (the two-pass and adjoint methods
    call it twice per step). :meth:`tesla_func.augment.DSA.replayable` makes one.
``RandomAugment``
    the augmentation of ordinary training (experts, evaluation): ``(x, generator) -> x`` draws a
    fresh transform from ``generator`` on every call. A :class:`tesla_func.augment.DSA` is one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Params = dict[str, Tensor]
StepAugment = Callable[[Tensor, int], Tensor]
RandomAugment = Callable[[Tensor, torch.Generator], Tensor]

"""One functional optimiser: SGD with momentum and weight decay, as an ``init`` / ``update`` pair.

Distillation (images, label logits, log beta), evaluation (K stacked networks at once, or one at a
time) and expert training all step with this one rule, the semantics of :class:`torch.optim.SGD`
(no dampening, no Nesterov)::

    g   = grad + weight_decay * p
    buf = momentum * buf + g          (buf starts at zero, so the first step has buf = g)
    p   = p - lr * buf

written with the same tensor operations as torch's single-tensor implementation (``add`` with
``alpha``), so a network trained with it is bitwise the network ``torch.optim.SGD`` trains on CPU.
Everything is elementwise, so parameters may be plain ``(...)`` tensors or stacked ``(K, ...)``
tensors of K models alike.

Functions return new dicts and never modify their inputs. The learning rate is an argument of
``update`` rather than of the optimiser, because evaluation drops it during training; it may be a
dict with one rate per name, as distillation has (images, label logits, log beta).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from tesla_func.types import Params


LearningRate = float | Mapping[str, float]  # one for every tensor, or one per name


class SGDState(NamedTuple):
    """Momentum buffers, one per parameter (empty when momentum is 0: torch keeps none then)."""

    momentum: Params


class Optimizer(NamedTuple):
    """A pure optimiser: ``state = init(params)``; ``params, state = update(params, grads, state, lr)``."""

    init: Callable[[Params], SGDState]
    update: Callable[[Params, Params, SGDState, LearningRate], tuple[Params, SGDState]]


def sgd(momentum: float = 0.0, weight_decay: float = 0.0) -> Optimizer:
    """SGD with heavy-ball ``momentum`` in [0, 1) and L2 ``weight_decay`` >= 0 (see module docs)."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"sgd momentum must lie in [0, 1), got {momentum}")
    if not weight_decay >= 0.0:
        raise ValueError(f"sgd weight_decay must be >= 0, got {weight_decay}")

    def init(params: Params) -> SGDState:
        return SGDState({k: torch.zeros_like(v) for k, v in params.items()} if momentum else {})

    def update(
        params: Params, grads: Params, state: SGDState, lr: LearningRate
    ) -> tuple[Params, SGDState]:
        rate = lr if isinstance(lr, Mapping) else dict.fromkeys(params, lr)
        steps = {
            k: grads[k].add(params[k], alpha=weight_decay) if weight_decay else grads[k]
            for k in params
        }
        if momentum:
            steps = {k: state.momentum[k].mul(momentum).add(steps[k]) for k in steps}
            state = SGDState(steps)
        return {k: params[k].add(steps[k], alpha=-rate[k]) for k in params}, state

    return Optimizer(init, update)

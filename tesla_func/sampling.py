"""Random draws, each from an explicit generator: seed streams, images per class, minibatches.

Nothing here touches torch's global RNG. Every function takes the generator it draws from, so a
run is fixed by its seeds alone and a resumed run continues the same streams.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def seeded_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for stream ``(seed, *stream)``, e.g. ``(seed, expert, purpose)``.

    The 64-bit torch seed comes from numpy's ``SeedSequence([seed, *stream])``, which mixes the
    words so that neighbouring streams are independent. A stream depends on its key only, so
    model k of an evaluation is the same network whatever the number of models, and switching
    augmentation off leaves the shuffling stream as it was.
    """
    words = np.random.SeedSequence([seed, *stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def per_class_indices(
    labels: Tensor,
    ipc: int,
    generator: torch.Generator,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> Tensor:
    """Indices of ``ipc`` distinct random rows of every class, class-major: ``(num_classes * ipc,)``.

    labels: (N,) int class indices in [0, num_classes) (num_classes defaults to labels.max() + 1).
    Draws, class by class, a permutation of the class's rows from ``generator`` and keeps its first
    ``ipc``. The synthetic set's initial images and the random-real baseline both come from here.
    """
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be (N,) int class indices, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("cannot pick images per class from an empty set")
    if not isinstance(ipc, int) or isinstance(ipc, bool) or ipc < 1:
        raise ValueError(f"ipc must be a positive int, got {ipc!r}")
    labels = labels.cpu()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    counts = torch.bincount(labels, minlength=num_classes)
    smallest = int(counts.min())
    if ipc > smallest:
        c = int(counts.argmin())
        name = f" ({class_names[c]!r})" if class_names is not None else ""
        raise ValueError(
            f"ipc {ipc} is larger than class {c}{name}, which has {smallest} training images: "
            f"lower ipc to at most {smallest}"
        )
    picks = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()  # (count_c,)
        picks.append(members[torch.randperm(len(members), generator=generator)[:ipc]])
    return torch.cat(picks)


def draw_minibatches(
    order: Tensor, n: int, batch: int, steps: int, generator: torch.Generator
) -> tuple[list[Tensor], Tensor]:
    """``steps`` non-overlapping minibatches of ``batch`` indices into ``range(n)``.

    ``order`` is what is left of the current permutation (empty at the start); a fresh
    ``randperm(n)`` is drawn whenever fewer than ``batch`` indices remain, so no index repeats
    within a permutation. Returns the minibatches and what is left of the order, to pass to the
    next call (a distillation checkpoints it).
    """
    if not 1 <= batch <= n:
        raise ValueError(f"minibatch size {batch} must lie in [1, {n}] (the set's size)")
    batches = []
    for _ in range(steps):
        if len(order) < batch:
            order = torch.randperm(n, generator=generator)
        batches.append(order[:batch])
        order = order[batch:]
    return batches, order

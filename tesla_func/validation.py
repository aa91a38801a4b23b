"""Checks of the arguments of :func:`tesla_func.matching.match_trajectory`, one process's view.

Every check raises a ``TypeError``/``ValueError`` that names the argument, what was wrong with it
and the fix. :func:`check_inputs` runs them all and returns the validated values as
:class:`Inputs` (detached, on the images' device and dtype); :func:`check_split` is the extra check
for a minibatch that is split into parts. Checks that read values are skipped for tensors that
have a shape but no data (``FakeTensorMode``, as a memory planner runs the methods); the shape
checks still run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.func import functional_call

from tesla_func.types import Params, accepts_rows


class Inputs(NamedTuple):
    """The validated arguments of one matching call on one process."""

    model: nn.Module
    buffers: Params  # the model's buffers, detached (read only)
    start: Params
    target: Params
    images: Tensor  # (N, C, H, W)
    labels: Tensor  # (N,) int64 or (N, K) float, on the images' device (and dtype if float)
    beta: Tensor  # () the student learning rate, in the images' dtype
    batches: tuple[Tensor, ...]  # T index tensors (B_i,) on the images' device
    augment: object
    state_stride: int
    keep_graphs: int  # as given (the matching clamps it to T)
    microbatch_size: int | None
    num_classes: int  # K, the model's number of outputs


def has_values(t: Tensor) -> bool:
    """False for a tensor with a shape but no data (``FakeTensorMode``)."""
    return not is_fake(t)


@contextlib.contextmanager
def batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """Let train-mode BatchNorm layers normalise with batch statistics without touching buffers.

    A student step only *reads* batch statistics in train mode; updating running statistics inside
    ``grad``/``vjp`` is an in-place write on a captured tensor (torch.func refuses it), and a
    recomputed step (two-pass, adjoint) would update them twice. Turning ``track_running_stats`` off
    for the duration of the call does exactly what the step needs; the flag is restored after.
    """
    flipped = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for m in flipped:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in flipped:
            m.track_running_stats = True


def batch_coupled_layers(model: nn.Module) -> list[str]:
    """Layers whose output for one row depends on the other rows of the batch: BatchNorm that
    normalises with batch statistics (train mode, or no running statistics)."""
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (m.training or m.running_mean is None)
    ]


def check_count(name: str, value: object, minimum: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} ({meaning}), got {value!r}")


def check_params(name: str, params: object, model: nn.Module) -> Params:
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{name} must be a dict[str, Tensor] of the model's parameters, "
            f"got {type(params).__name__}"
        )
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{name} does not match the model's parameters: missing keys {missing}, "
            f"unexpected keys {unexpected}. Pass dict(model.named_parameters())-style keys."
        )
    out = {}
    for key, ref in expected.items():
        value = params[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a Tensor, got {type(value).__name__}")
        if value.shape != ref.shape:
            raise ValueError(
                f"{name}[{key!r}] has shape {tuple(value.shape)} but the model's "
                f"parameter has shape {tuple(ref.shape)}"
            )
        if not value.is_floating_point():
            raise TypeError(f"{name}[{key!r}] must be floating point, got {value.dtype}")
        out[key] = value.detach()
    return out


def check_beta(beta: object, like: Tensor) -> Tensor:
    """The student learning rate beta > 0 as a () tensor of ``like``'s dtype and device."""
    if isinstance(beta, (int, float)) and not isinstance(beta, bool):
        beta = torch.tensor(float(beta))
    if not isinstance(beta, Tensor) or beta.numel() != 1 or not beta.is_floating_point():
        raise TypeError(f"beta must be a floating-point scalar tensor, got {beta!r}")
    value = float(beta.detach().reshape(())) if has_values(beta) else 1.0
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"beta must be finite and > 0, got {value}; a negative or NaN student "
            "learning rate means the distillation diverged (parametrise it as exp(log_lr))"
        )
    return beta.detach().reshape(()).to(dtype=like.dtype, device=like.device)


def check_batches(
    batches: object, num_images: int, device: torch.device, *, allow_empty: bool
) -> tuple[Tensor, ...]:
    """T index tensors into the images; an empty one only where ``allow_empty`` (a rank may hold
    no row of a step: the step then needs rows on another rank, checked across ranks)."""
    if isinstance(batches, Tensor) and batches.dim() == 2:
        batches = list(batches)
    if not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)):
        raise TypeError("batches must be a sequence of T LongTensors of indices into images")
    if len(batches) == 0:
        raise ValueError("batches is empty: pass at least one index batch (T >= 1 student steps)")
    for i, index in enumerate(batches):
        if not isinstance(index, Tensor) or index.dtype != torch.long or index.dim() != 1:
            raise TypeError(
                f"batches[{i}] must be a 1-D int64 (Long) tensor of indices, got "
                f"{getattr(index, 'dtype', type(index).__name__)} of shape "
                f"{tuple(getattr(index, 'shape', ()))}"
            )
        if index.numel() == 0 and not allow_empty:
            raise ValueError(f"batches[{i}] is empty: every student step needs at least one image")
    # The bounds of every batch at once: one read of the device (a host sync on CUDA), not 2 T
    filled = [index for index in batches if index.numel() and has_values(index)]
    if filled:
        every = torch.cat([index.to(filled[0].device) for index in filled])
        lo, hi = torch.stack([every.min(), every.max()]).tolist()
        if lo < 0 or hi >= num_images:  # name the first bad batch (this path may read more)
            for i, index in enumerate(batches):
                lo, hi = (int(index.min()), int(index.max())) if index.numel() else (0, 0)
                if lo < 0 or hi >= num_images:
                    raise ValueError(
                        f"batches[{i}] holds indices in [{lo}, {hi}] but images has "
                        f"{num_images} rows: indices must lie in [0, {num_images - 1}]"
                    )
    return tuple(index.to(device) for index in batches)


def check_images(images: object) -> Tensor:
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() < 2:
        raise TypeError(
            "images must be a floating-point tensor of shape (N, C, H, W), got "
            f"{getattr(images, 'dtype', type(images).__name__)} of shape "
            f"{tuple(getattr(images, 'shape', ()))}"
        )
    if images.shape[0] == 0:
        raise ValueError("images is empty (N = 0)")
    if has_values(images) and not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf; check the last image update (lower lr_img)")
    return images.detach()


def check_labels(labels: object, images: Tensor, num_classes: int) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a Tensor, got {type(labels).__name__}")
    labels = labels.detach()
    n = images.shape[0]
    if labels.is_floating_point():
        if labels.shape != (n, num_classes):
            raise ValueError(
                f"float labels are label logits of shape (N, K) = ({n}, "
                f"{num_classes}), got {tuple(labels.shape)}"
            )
        if has_values(labels) and not torch.isfinite(labels).all():
            raise ValueError("label logits contain NaN or inf")
        return labels.to(dtype=images.dtype, device=images.device)
    if labels.dtype == torch.long:
        if labels.shape != (n,):
            raise ValueError(
                f"int labels are class indices of shape (N,) = ({n},), got {tuple(labels.shape)}"
            )
        lo, hi = (torch.stack([labels.min(), labels.max()]).tolist() if has_values(labels)
                  else (0, 0))  # one read of the device
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels hold classes in [{lo}, {hi}] but the model has "
                f"{num_classes} outputs: classes must lie in [0, {num_classes - 1}]"
            )
        return labels.to(images.device)
    raise TypeError(
        f"labels must be int64 class indices (N,) or float logits (N, K), got {labels.dtype}"
    )


def num_classes(model: nn.Module, params: Params, buffers: Params, images: Tensor) -> int:
    """K, from the model's output on two images (a cheap forward without a graph)."""
    with torch.no_grad(), batch_statistics_only(model):
        out = functional_call(model, (params, buffers), (images[:2],), strict=True)
    if out.dim() != 2:
        raise ValueError(
            f"the model must map (N, ...) images to (N, K) logits, got an output of "
            f"shape {tuple(out.shape)}"
        )
    return out.shape[1]


def check_inputs(
    model: object,
    start: object,
    target: object,
    images: object,
    labels: object,
    beta: object,
    batches: object,
    augment: object,
    state_stride: object,
    keep_graphs: object,
    microbatch_size: object,
    *,
    allow_empty_batches: bool = False,
) -> Inputs:
    """Validate one process's arguments of :func:`~tesla_func.matching.match_trajectory`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module skeleton, got {type(model).__name__}")
    images = check_images(images)
    start = check_params("start", start, model)
    target = check_params("target", target, model)
    for key, value in start.items():
        if value.dtype != images.dtype or value.device != images.device:
            raise TypeError(
                f"start[{key!r}] is {value.dtype} on {value.device} but images are "
                f"{images.dtype} on {images.device}: move both to one dtype/device"
            )
        other = target[key]
        if other.dtype != value.dtype or other.device != value.device:
            raise TypeError(
                f"target[{key!r}] is {other.dtype} on {other.device} but start is "
                f"{value.dtype} on {value.device}"
            )
    first = next(iter(start))
    # one read of the device (a host sync on CUDA) for all the tensors
    if has_values(start[first]) and float(
        sum((start[k] - target[k]).square().sum() for k in start)
    ) == 0.0:
        raise ValueError(
            "start and target are identical, so ||start - target||^2 = 0 and the "
            "normalised loss is undefined: pick target = a later expert checkpoint"
        )
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    beta = check_beta(beta, images)
    batches = check_batches(
        batches, images.shape[0], images.device, allow_empty=allow_empty_batches
    )
    if augment is not None and not callable(augment):
        raise TypeError("augment must be None or a callable (x, step) -> x")
    check_count("state_stride", state_stride, 1, "keep every state_stride-th student state")
    check_count(
        "keep_graphs", keep_graphs, 0, "the number of final steps whose pass-1 graphs are kept"
    )
    if microbatch_size is not None:
        check_count(
            "microbatch_size",
            microbatch_size,
            1,
            "the most rows that go through the network at once; None: whole minibatches",
        )
    k = num_classes(model, start, buffers, images)
    labels = check_labels(labels, images, k)
    return Inputs(
        model=model,
        buffers=buffers,
        start=start,
        target=target,
        images=images,
        labels=labels,
        beta=beta,
        batches=batches,
        augment=augment,
        state_stride=state_stride,
        keep_graphs=keep_graphs,
        microbatch_size=microbatch_size,
        num_classes=k,
    )


def check_split(
    split_steps: Sequence[int],
    sizes: Sequence[int],
    model: nn.Module,
    augment: object,
    how: str,
) -> None:
    """Checks for minibatches split into parts (microbatches, or rows on several ranks).

    ``split_steps``: the steps whose minibatch is split; ``sizes``: every step's minibatch size
    (over all ranks); ``how``: what splits the first one, for the messages. A split needs
    row-independent layers (Eq. M1) and an augmentation that takes the rows' positions; an
    augmentation that knows the ``batch_sizes`` it was drawn for must
    match the minibatches whether split or not.
    """
    drawn = getattr(augment, "batch_sizes", None)
    if drawn is not None and (
        len(drawn) < len(sizes) or any(int(a) != b for a, b in zip(drawn, sizes))
    ):
        raise ValueError(
            f"augment holds transforms drawn for {len(drawn)} steps of minibatch sizes "
            f"{list(drawn)}, but the {len(sizes)} steps have minibatches of {list(sizes)} rows"
            " (counted over every rank): draw it for these sizes, e.g. "
            "DSA().replayable(sizes, generator)"
        )
    if not split_steps:
        return
    if augment is not None and not accepts_rows(augment):
        raise TypeError(
            f"the minibatch of step {split_steps[0]} is split ({how}), so augment must accept "
            "the keyword rows=: augment(x, step, rows=rows) applies to x the transforms drawn for "
            "those positions of the step's minibatch (ReplayedDSA from DSA().replayable does). "
            "Add a rows=None keyword to your augment (ignore it if every row gets the same "
            "transform)"
        )
    coupled = batch_coupled_layers(model)
    if coupled:
        raise ValueError(
            f"the minibatch of step {split_steps[0]} is split ({how}), but the model's "
            f"BatchNorm layers {coupled} normalise with batch statistics (train mode), which "
            "couples the rows: a part's statistics are not the minibatch's. Put them in eval "
            "mode (model.eval()), use instance norm (ConvNet norm='instance'), or do not split "
            "(microbatch_size=None, one process)"
        )

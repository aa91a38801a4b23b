"""The sums that cross ranks: a differentiable all-reduce, sums of parameter dicts and of floats,
a barrier, and float64 checksums that compare tensors across ranks without moving them.

Matching on several ranks sends only parameter-sized tensors (:func:`sum_over_ranks`; ``unrolled``
differentiates through :func:`all_reduce_sum`); distillation and evaluation sum Python floats
(:func:`sum_floats`). Every function but the checksums is a collective: every rank of ``group``
calls it, in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from tesla_func.distributed.launch import collective_device
from tesla_func.types import Params


class _AllReduceSum(torch.autograd.Function):
    """x -> sum of x over the ranks of ``group``. A sum is linear, so its backward is the same sum
    of the cotangents, itself differentiable: any order of derivatives works, under autograd and
    under torch.func transforms (``setup_context`` form, with a ``vmap`` rule)."""

    @staticmethod
    def forward(x: Tensor, group: object) -> Tensor:
        out = x.clone()  # all_reduce writes in place; the input stays untouched
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad_output, ctx.group), None

    @staticmethod
    def vmap(info, in_dims, x: Tensor, group: object) -> tuple[Tensor, int | None]:
        # The sum is elementwise: reduce the whole batch at once (every rank vmaps alike).
        if in_dims[0] is None:
            return _AllReduceSum.apply(x, group), None
        return _AllReduceSum.apply(x.movedim(in_dims[0], 0), group), 0


def all_reduce_sum(x: Tensor, group: object) -> Tensor:
    """Differentiable sum of ``x`` over the ranks of ``group`` (every rank gets the sum)."""
    return _AllReduceSum.apply(x, group)


def _flat(values: tuple[Params, ...]) -> Tensor:
    return torch.cat([v.reshape(-1) for d in values for v in d.values()])  # (sum of sizes,)


def _unflat(flat: Tensor, like: tuple[Params, ...]) -> tuple[Params, ...]:
    out, at = [], 0
    for d in like:
        part = {}
        for k, v in d.items():
            part[k] = flat[at : at + v.numel()].view_as(v)
            at += v.numel()
        out.append(part)
    return tuple(out)


def sum_over_ranks(group: object, *values: Params) -> tuple[Params, ...]:
    """Each parameter dict summed over the ranks, all in one all-reduce (no graph)."""
    with torch.no_grad():
        flat = _flat(values)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return _unflat(flat, values)


def sum_over_ranks_differentiable(group: object, value: Params) -> Params:
    """A parameter dict summed over the ranks in one all-reduce that autodiff goes through."""
    (out,) = _unflat(all_reduce_sum(_flat((value,)), group), (value,))
    return out


def sum_floats(group: object, values: Sequence[float]) -> list[float]:
    """Python floats summed over the ranks in one float64 all-reduce."""
    flat = torch.tensor(list(values), dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return flat.cpu().tolist()


def max_float(group: object, value: float) -> float:
    flat = torch.tensor([value], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    return float(flat)


def barrier(group: object) -> None:
    dist.barrier(group=group)


def world_size(group: object) -> int:
    return dist.get_world_size(group)


def checksums(params: Mapping[str, Tensor]) -> tuple[float, float, float]:
    """Sum, sum of squares and a position-weighted sum, in float64: equal on ranks that hold the
    same tensors (the same reduction of the same bits), different for almost any difference."""
    s1 = s2 = s3 = 0.0
    for v in params.values():
        x = v.detach().reshape(-1).to(torch.float64)
        weights = torch.linspace(-1.0, 1.0, x.numel(), dtype=torch.float64, device=x.device)
        s1 += float(x.sum())
        s2 += float(x.square().sum())
        s3 += float((x * weights).sum())
    return s1, s2, s3


def checksum(tensor: Tensor) -> str:
    """A float64 fingerprint of a tensor's values (its shape, sum, sum of squares and a
    position-weighted sum): equal on ranks that hold the same values, different for almost any
    difference."""
    if tensor.numel() == 0:
        return f"{tuple(tensor.shape)}"
    return f"{tuple(tensor.shape)} {checksums({'x': tensor})}"

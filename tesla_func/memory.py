"""Peak memory of a call: measured (live tensor bytes on CPU, the CUDA allocator's peak) or
predicted without running it for real (the same count on tensors that have shapes but no data).

On CPU, process RSS is noisy (allocator caching, fragmentation, other threads), so the library
counts what autograd actually keeps: every tensor storage created while the tracker is active is
added when an operator returns it and subtracted when its storage is freed (a weak-reference
finalizer on the storage). Views share a storage and are counted once. The count is the same on
every run of the same code with the same shapes, so tests may assert on it.

Only storages created *inside* the tracked call are counted: the inputs (images, expert
checkpoints) are live before and after and are not part of the method's cost. An operator output
that shares a storage with one of the operator's inputs (a view, ``detach``, an in-place result)
is never a new allocation, whether that storage is tracked or was the caller's.

The tracker is a :class:`~torch.utils._python_dispatch.TorchDispatchMode`, so it sees every ATen
operator, including those that ``torch.func`` transforms run on unwrapped tensors, and the
tensors autograd saves for backward (they are operator outputs too).

**Prediction.** :func:`predict_peak_memory` and :func:`predict_cost` run the very same code under
torch's ``FakeTensorMode``: every operator computes its output's shape, dtype and aliasing from a
meta kernel and allocates nothing. The tracker counts fake storages exactly as it counts real ones
(it keys storages by identity; fake storages have no data pointer), so on CPU the prediction
equals :func:`measure_peak_memory` byte for byte, for any size, in the time the Python dispatch
takes (about a millisecond per operator), with the process's own memory untouched.
:func:`predict_cost` also counts floating-point operations with the formulas of
``torch.utils.flop_counter`` (matmuls, convolutions and attention only; see :class:`Cost`).

**Sizes.** :func:`parse_bytes` reads a memory size as people write it (``"48GB"``, ``"24GiB"``);
:func:`format_bytes` writes one in binary units.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeCopyMode,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry

# Operators whose output is a tensor created outside the dispatcher and handed in as the input:
# torch.tensor(...) builds the data, then calls lift_fresh on it. The output aliases the input and
# is still a new allocation.
_FRESH = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


def _input_storages(args: tuple, kwargs: dict) -> set[int]:
    """Identities of the storages of an operator's tensor arguments (ATen operators take tensors
    directly or in one list, e.g. ``cat``), so a plain loop does what a pytree walk would."""
    out = set()
    for arg in (*args, *kwargs.values()):
        for t in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(t, Tensor) and t.device.type != "meta":
                out.add(id(t.untyped_storage()))
    return out


class LiveTensorTracker(TorchDispatchMode):
    """Counts bytes of tensor storages created by operators and still alive; records the peak.

    Storages are keyed by identity (:meth:`storage_key`): a storage's Python object lives exactly
    as long as the storage (PyTorch keeps the two together), and fake storages, which have no
    data pointer, are told apart like real ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._tracked: set[object] = set()

    @staticmethod
    def storage_key(storage: torch.UntypedStorage) -> object:
        """What tells two live storages apart: the storage object's identity."""
        return id(storage)

    def _release(self, key: object, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = set() if func in _FRESH else _input_storages(args, kwargs)
        for leaf in (out,) if isinstance(out, Tensor) else tree_leaves(out):
            if not isinstance(leaf, Tensor) or leaf.device.type == "meta":
                continue
            storage = leaf.untyped_storage()
            nbytes = storage.nbytes()
            key = self.storage_key(storage)
            if nbytes == 0 or key in self._tracked or id(storage) in inputs:
                continue  # a view or an in-place result: counted already, or the caller's memory
            self._tracked.add(key)
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


class FlopCounter(TorchDispatchMode):
    """Counts floating-point operations with ``torch.utils.flop_counter``'s formulas.

    The same formulas and totals as ``torch.utils.flop_counter.FlopCounterMode`` (a test checks
    the totals agree), but a plain dispatch mode: FlopCounterMode also installs module hooks for
    its per-module table, and those hooks keep some tensors alive a little longer, which would
    change the live-tensor count it runs beside (by 5 KB of 1.4 MB on a small ConvNet).
    Operators without a formula (elementwise, norms, pooling, reductions) count zero.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            n = int(formula(*args, **kwargs, out_val=out))
            name = func._overloadpacket.__name__
            self.flops += n
            self.by_op[name] = self.by_op.get(name, 0) + n
        return out


@dataclass(frozen=True)
class PeakMemory:
    """Peak extra memory of one call, in bytes, and how it was measured (or predicted)."""

    peak_bytes: int
    # "live-tensors" (CPU, deterministic), "cuda-allocator", or "predicted-live-tensors" (the
    # live-tensor count of a run on fake tensors: predict_peak_memory)
    kind: str

    @property
    def megabytes(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def predicted(self) -> bool:
        """True for a prediction from a run on fake tensors, False for a measurement."""
        return self.kind.startswith("predicted")


@dataclass(frozen=True)
class Cost:
    """Predicted cost of one call (:func:`predict_cost`).

    peak_bytes: the peak live tensor bytes the call adds (as :func:`measure_peak_memory` on CPU).
    flops:      floating-point operations of matrix multiplications (mm, addmm, bmm, baddbmm),
                convolutions (forward and backward) and attention kernels, a multiply-add counted
                as 2; elementwise operators, normalisation, pooling and reductions count 0.
    flops_by_op: the same split by ATen operator name (e.g. "convolution_backward").
    """

    peak_bytes: int
    flops: int
    flops_by_op: Mapping[str, int] = field(default_factory=dict, compare=False)

    @property
    def memory(self) -> PeakMemory:
        return PeakMemory(self.peak_bytes, "predicted-live-tensors")

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def measure_peak_memory(
    fn: Callable[..., Any], *args, device: str | torch.device = "cpu", **kwargs
) -> tuple[Any, PeakMemory]:
    """Run ``fn(*args, **kwargs)``; return (its result, the peak memory it added).

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at entry (the allocator's own
    count). CPU: :class:`LiveTensorTracker`'s peak of live tensor bytes created by the call.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return result, PeakMemory(
            torch.cuda.max_memory_allocated(device) - before, "cuda-allocator"
        )
    with LiveTensorTracker() as tracker:
        result = fn(*args, **kwargs)
    return result, PeakMemory(tracker.peak_bytes, "live-tensors")


# ----------------------------------------------------------------------------------------------
# Prediction: the same call on fake tensors.


def _fake_tensor(t: Tensor, mode: FakeTensorMode) -> Tensor:
    """A fake twin of ``t``: same shape, strides, dtype and requires_grad, no data.

    A tensor on the meta device stands for a CPU tensor of its shape (so callers can describe
    inputs of any size without allocating them).
    """
    if t.device.type == "meta":
        with mode:
            fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
        return fake.requires_grad_(t.requires_grad) if t.is_leaf else fake
    return mode.from_tensor(t, static_shapes=True)


def _fake_copy(tree: object, mode: FakeTensorMode) -> object:
    """``tree`` with every tensor replaced by a fake twin, aliasing kept.

    Walks pytrees (tuples, lists, dicts, namedtuples). An ``nn.Module`` leaf becomes a copy of the
    module whose parameters and buffers are fake (the caller's module is not touched); a dataclass
    instance (e.g. a :class:`~tesla_func.augment.ReplayedDSA`) becomes a copy with its tensors
    fake. Other objects are passed as they are: real tensors they hold (a closure's) are turned
    into fakes where an operator first reads them.
    """
    memo: dict[int, Any] = {}

    def tensor(t: Tensor) -> Tensor:
        if id(t) not in memo:
            fake = _fake_tensor(t, mode)
            if isinstance(t, nn.Parameter):
                fake = nn.Parameter(fake, t.requires_grad)
            memo[id(t)] = fake
        return memo[id(t)]

    def leaf(x: object) -> object:
        if isinstance(x, Tensor):
            return tensor(x)
        if isinstance(x, nn.Module):
            for t in (*x.parameters(), *x.buffers()):
                tensor(t)  # into the memo, so deepcopy reuses the fakes instead of copying data
        elif not (dataclasses.is_dataclass(x) and not isinstance(x, type)):
            return x
        with FakeCopyMode(mode):  # any other tensor attribute: faked as deepcopy meets it
            return copy.deepcopy(x, memo)

    return tree_map(leaf, tree)


def _fake_run(
    fn: Callable[..., Any], args: tuple, kwargs: dict, *, count_flops: bool
) -> tuple[Any, int, FlopCounter | None]:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    # allow_non_fake_inputs: real tensors reached through closures become fakes when first used
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fn, args, kwargs = _fake_copy((fn, args, kwargs), mode)
    flops = FlopCounter() if count_flops else None
    try:
        with mode, flops or contextlib.nullcontext(), LiveTensorTracker() as tracker:
            result = fn(*args, **kwargs)
    except (DataDependentOutputException, DynamicOutputShapeException) as err:
        raise ValueError(
            f"fn read tensor values ({err}), which tensors without data do not have: a "
            "prediction runs on shapes only. Skip value checks for fake tensors "
            "(torch._subclasses.fake_tensor.is_fake, as match_trajectory does) or move them "
            "out of fn"
        ) from err
    return result, tracker.peak_bytes, flops


def predict_peak_memory(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, PeakMemory]:
    """Predict the peak memory of ``fn(*args, **kwargs)`` without allocating it.

    Runs ``fn`` on fake copies of its arguments (tensors with shapes, dtypes and aliasing but no
    data; ``nn.Module`` arguments, ``fn`` itself if it is one, and dataclass arguments are copied
    with fake parameters, buffers and tensors; the caller's objects are not modified) under
    :class:`LiveTensorTracker`. Tensors on the meta device stand for CPU tensors of their shape.

    Returns:
        (the result, made of fake tensors: shapes only; ``PeakMemory`` with ``kind``
        "predicted-live-tensors"). On CPU the bytes equal :func:`measure_peak_memory`'s for the
        same call. On CUDA a real run adds the allocator's rounding (512-byte blocks) and the
        workspaces of cuDNN/cuBLAS, which no tensor holds.

    Raises:
        TypeError: ``fn`` is not callable.
        ValueError: ``fn`` reads tensor values (``.item()``, ``float(t)``, ``nonzero``), which a
            run without data cannot do.
    """
    result, peak, _ = _fake_run(fn, args, kwargs, count_flops=False)
    return result, PeakMemory(peak, "predicted-live-tensors")


def predict_cost(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, Cost]:
    """:func:`predict_peak_memory` and the FLOPs of the same fake run.

    Returns:
        (the result, made of fake tensors; :class:`Cost` with ``peak_bytes``, ``flops`` and
        ``flops_by_op``). FLOPs count matrix multiplications, convolutions and attention (the
        formulas of ``torch.utils.flop_counter``), a multiply-add as 2; see :class:`Cost`.
    """
    result, peak, flops = _fake_run(fn, args, kwargs, count_flops=True)
    return result, Cost(peak, flops.flops, dict(flops.by_op))


# ----------------------------------------------------------------------------------------------
# Sizes in bytes, read and written as people write them


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str | float) -> int:
    """A memory size in bytes: ``"24GiB"``, ``"48GB"``, ``"80e9"``, ``"512MiB"``, ``"1.5 TB"``.

    Units: B, kB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of 1024), any case; a bare
    number is bytes. Raises ``ValueError`` naming the text and the accepted forms otherwise.
    """
    if isinstance(text, bool):
        raise TypeError(f"a memory size must be a number or text like '48GB', got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"cannot read {text!r} as a memory size: write a number with an optional unit, "
                "e.g. '24GiB', '48GB', '80e9' (bytes) or '512MiB' (units: B, kB, MB, GB, TB, KiB, "
                "MiB, GiB, TiB)"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"a memory size must be finite and > 0, got {text!r}")
    return int(size)


def format_bytes(n: float) -> str:
    """Bytes in KiB below 1 MiB, MiB below 1 GiB, else GiB (binary units)."""
    if abs(n) < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB" if abs(n) < 2**30 else f"{n / 2**30:.2f} GiB"

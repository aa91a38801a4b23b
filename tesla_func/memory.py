"""Peak memory of a call: live tensor bytes (deterministic on CPU) or the CUDA allocator's peak.

On CPU, process RSS is noisy (allocator caching, fragmentation, other threads), so the library
counts what autograd actually keeps: every tensor storage created while the tracker is active is
added when an operator returns it and subtracted when its storage is freed (a weak-reference
finalizer on the storage). Views share a storage and are counted once. The count is the same on
every run of the same code with the same shapes, so tests may assert on it.

Only storages created *inside* the tracked call are counted: the inputs (images, expert
checkpoints) are live before and after and are not part of the method's cost.

The tracker is a :class:`~torch.utils._python_dispatch.TorchDispatchMode`, so it sees every ATen
operator, including those that ``torch.func`` transforms run on unwrapped tensors, and the
tensors autograd saves for backward (they are operator outputs too).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorTracker(TorchDispatchMode):
    """Counts bytes of tensor storages created by operators and still alive; records the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._tracked: set[tuple[str, int]] = set()

    def _release(self, key: tuple[str, int], nbytes: int) -> None:
        self._tracked.discard(key)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if not isinstance(leaf, torch.Tensor) or leaf.device.type == "meta":
                continue
            storage = leaf.untyped_storage()
            nbytes = storage.nbytes()
            key = (str(leaf.device), storage.data_ptr())
            if nbytes == 0 or key in self._tracked:
                continue  # a view or an in-place result: its storage is counted already
            self._tracked.add(key)
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


@dataclass(frozen=True)
class PeakMemory:
    """Peak extra memory of one call, in bytes, and how it was measured."""

    peak_bytes: int
    kind: str  # "live-tensors" (CPU, deterministic) or "cuda-allocator"

    @property
    def megabytes(self) -> float:
        return self.peak_bytes / 2**20


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

"""Graph memory, asserted on the deterministic live-tensor count (tesla_func.memory)."""

from __future__ import annotations

import pytest
import torch

from tesla_func import ConvNet, match_trajectory, measure_peak_memory
from tesla_func.memory import LiveTensorTracker
from tesla_func.models import init_params


def test_tracker_counts_live_storages_and_views_once():
    with LiveTensorTracker() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        view = a[:10]  # a view: no new storage
        b = a * 2  # 4000 more
        assert tracker.live_bytes == 8000
        del b
        assert tracker.live_bytes == 4000
        del view, a
    assert tracker.peak_bytes == 8000
    assert tracker.live_bytes == 0


def _peak(method, steps):
    gen = torch.Generator().manual_seed(0)
    model = ConvNet(channels=1, num_classes=4, image_size=16, width=8, depth=2)
    start = init_params(model, gen)
    target = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    images = torch.randn(32, 1, 16, 16, generator=gen)
    labels = torch.arange(32) % 4
    batches = [torch.arange(32)] * steps
    _, peak = measure_peak_memory(
        match_trajectory,
        model,
        start,
        target,
        images,
        labels,
        torch.tensor(0.01),
        batches,
        method=method,
    )
    assert peak.kind == "live-tensors"
    return peak.peak_bytes


def test_peak_is_deterministic():
    assert _peak("tesla", 3) == _peak("tesla", 3)


@pytest.mark.parametrize("method", ["tesla", "exact"])
def test_graph_memory_constant_in_steps(method):
    short, long = _peak(method, 2), _peak(method, 16)
    assert long <= 1.1 * short, f"{method}: peak {long} B at T=16 vs {short} B at T=2"


def test_unrolled_memory_grows_with_steps():
    short, long = _peak("unrolled", 2), _peak("unrolled", 16)
    assert long >= 3 * short, f"unrolled: peak {long} B at T=16 vs {short} B at T=2"

"""Graph memory, asserted on the deterministic live-tensor count (tesla_func.memory).

The count is exact on CPU, so the growth of a method's peak from T to T' is asserted to the byte,
in parameter vectors P (the bytes of one student state): a method that stored one more state than
its code says it keeps fails.
"""

from __future__ import annotations

import functools

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


def _problem():
    gen = torch.Generator().manual_seed(0)
    model = ConvNet(channels=1, num_classes=4, image_size=16, width=8, depth=2)
    start = init_params(model, gen)
    target = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    images = torch.randn(32, 1, 16, 16, generator=gen)
    return model, start, target, images, torch.arange(32) % 4


def _state_bytes() -> int:
    """P: the bytes of one parameter vector (student state) of the test problem: 1,212 floats."""
    _, start, *_ = _problem()
    return sum(v.numel() * v.element_size() for v in start.values())


@functools.cache
def _peak(method, steps, state_stride=1):
    model, start, target, images, labels = _problem()
    batches = [torch.arange(32)] * steps
    _, peak = measure_peak_memory(
        match_trajectory, model, start, target, images, labels, torch.tensor(0.01), batches,
        method=method, state_stride=state_stride,
    )
    assert peak.kind == "live-tensors"
    return peak.peak_bytes


def exact_state_vectors(steps: int, stride: int) -> int:
    """Student states ``exact`` holds at its peak (T >= 2), read off its code (matching.exact).

    The forward pass keeps theta_j for j a multiple of k = ``stride`` (theta_0 is the input
    ``start``, not counted) and theta_{T-1}, whose graph the walk back uses first and whose name
    (``params``) it holds to the end. Walking back, step i < T - 1 rebuilds its segment from the
    checkpoint c = i - i mod k: while step i's graph is alive, the checkpoints below c (k, 2k, ...,
    c - k), the states c..i of the segment and theta_{T-1} are alive. The peak is the largest of
    these counts: (T/k + k) parameter vectors, roughly (proofs/d_memory.md, D4).
    """
    counts = []
    for i in range(steps - 1):
        c = i - i % stride
        below = max(c // stride - 1, 0)  # checkpoints k .. c - k
        segment = i - c + (c > 0)  # states c..i, less theta_0 when c = 0
        counts.append(below + segment + 1)  # + theta_{T-1}
    return max(counts)


def tesla_state_vectors(steps: int) -> int:
    """Parameter vectors ``tesla``'s peak holds beyond its peak at T = 1 (measured and asserted
    below): theta_{T-1} from T = 2; from T = 3 also pass 2's rebuilt theta_i (i >= 1) next to
    the previous step's g. Nothing grows after that: pass 2 rebuilds, it stores nothing."""
    return min(steps - 1, 2)


def test_peak_is_deterministic():
    assert _peak("tesla", 3) == _peak.__wrapped__("tesla", 3)


def test_state_vector_ledgers_read_off_the_code():
    """The two ledgers on hand-counted cases, so that a slip in them cannot hide a regression."""
    assert [exact_state_vectors(t, 1) for t in (2, 3, 9)] == [1, 2, 8]  # theta_1..theta_{T-1}
    # k = 3, T = 9: walking back from step 7, the segment 6, 7 is rebuilt from theta_6 while
    # theta_3 and theta_8 are kept: 4. Step 5's segment 3, 4, 5 with theta_8: 4 as well.
    assert exact_state_vectors(9, 3) == 4
    assert exact_state_vectors(10, 3) == 5  # step 8: theta_3, theta_6..theta_8, theta_9
    assert [tesla_state_vectors(t) for t in (1, 2, 3, 40)] == [0, 1, 2, 2]


def test_tesla_peak_is_the_same_at_every_steps_from_three():
    """(D2): pass 2 rebuilds the states, so from T = 3 on the peak does not grow by one byte;
    storing the T states (as the public TESLA code does) would add T - 3 parameter vectors."""
    p = _state_bytes()
    peaks = {t: _peak("tesla", t) for t in (1, 2, 3, 10)}
    growth = {t: peaks[t] - peaks[1] for t in peaks}
    assert growth == {t: tesla_state_vectors(t) * p for t in peaks}, (growth, p)


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_exact_peak_grows_by_the_states_it_stores(stride):
    """(D3), (D4): from T = 4 to T = 9 the peak of ``exact`` grows by exactly the parameter
    vectors :func:`exact_state_vectors` counts (5, 3, 1 and 2 for k = 1..4), and nothing else:
    the step graph is the same size at every T."""
    p = _state_bytes()
    growth = _peak("exact", 9, stride) - _peak("exact", 4, stride)
    expected = exact_state_vectors(9, stride) - exact_state_vectors(4, stride)
    assert growth == expected * p, (
        f"exact, state_stride={stride}: the peak grew by {growth} B = {growth / p:.3f} "
        f"parameter vectors from T=4 to T=9; its code keeps {expected} more"
    )


def test_unrolled_memory_grows_with_steps():
    short, long = _peak("unrolled", 2), _peak("unrolled", 16)
    assert long >= 3 * short, f"unrolled: peak {long} B at T=16 vs {short} B at T=2"

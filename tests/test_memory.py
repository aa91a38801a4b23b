"""Graph memory, asserted on the deterministic live-tensor count (tesla_func.memory), and its
prediction on fake tensors (shapes without data), which must equal the count of the real run.

The count is exact on CPU, so the growth of a method's peak from T to T' is asserted to the byte,
in parameter vectors P (the bytes of one student state): a method that stored one more state than
its code says it keeps fails.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.flop_counter import FlopCounterMode

from tesla_func import (
    METHODS,
    ConvNet,
    PeakMemory,
    match_trajectory,
    measure_peak_memory,
    predict_cost,
    predict_peak_memory,
)
from tesla_func.augment import DSA
from tesla_func.memory import LiveTensorTracker, format_bytes, parse_bytes
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


def test_tracker_does_not_count_the_callers_storages():
    """Views, detach and in-place results of the inputs are the caller's memory, not the call's."""
    x = torch.ones(1000)
    for fn in (lambda x: x.detach(), lambda x: x[:10], lambda x: x.view(10, 100),
               lambda x: x.add_(1.0)):
        assert measure_peak_memory(fn, x)[1].peak_bytes == 0
        assert predict_peak_memory(fn, x)[1].peak_bytes == 0
    # torch.tensor(data) is created outside the dispatcher and handed to lift_fresh: still new

    def make():
        return torch.tensor([1.0, 2.0])

    assert measure_peak_memory(make)[1].peak_bytes == predict_peak_memory(make)[1].peak_bytes == 8


def test_fake_storages_are_told_apart():
    """Fake storages have no data pointer: keyed by identity, two of them are two storages."""

    def two():
        a, b = torch.ones(10), torch.ones(20)
        return a, b

    assert predict_peak_memory(two)[1].peak_bytes == measure_peak_memory(two)[1].peak_bytes == 120


def _problem(method, steps, *, width=8, depth=2, n=32, batch=None, soft=False, dsa=False,
             dtype=torch.float32, seed=0, model=None):
    """Arguments of match_trajectory for a small ConvNet problem (or the given model)."""
    gen = torch.Generator().manual_seed(seed)
    model = model or ConvNet(channels=3, num_classes=4, image_size=16, width=width, depth=depth)
    model = model.to(dtype)
    start = {k: v.to(dtype) for k, v in init_params(model, gen).items()}
    target = {k: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=dtype)
              for k, v in start.items()}
    images = torch.randn(n, 3, 16, 16, generator=gen, dtype=dtype)
    labels = (torch.randn(n, 4, generator=gen, dtype=dtype) if soft
              else torch.randint(0, 4, (n,), generator=gen))
    batch = batch or n
    batches = [torch.randperm(n, generator=gen)[:batch] for _ in range(steps)]
    augment = (DSA().replayable([batch] * steps, gen, dtype=dtype) if dsa else None)
    args = (model, start, target, images, labels, torch.tensor(0.01, dtype=dtype), batches)
    return args, {"method": method, "augment": augment}


def _growth_problem():
    gen = torch.Generator().manual_seed(0)
    model = ConvNet(channels=1, num_classes=4, image_size=16, width=8, depth=2)
    start = init_params(model, gen)
    target = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    images = torch.randn(32, 1, 16, 16, generator=gen)
    return model, start, target, images, torch.arange(32) % 4


def _state_bytes() -> int:
    """P: the bytes of one parameter vector (student state) of the test problem: 1,212 floats."""
    _, start, *_ = _growth_problem()
    return sum(v.numel() * v.element_size() for v in start.values())


@functools.cache
def _growth_peak(method, steps, state_stride=1):
    model, start, target, images, labels = _growth_problem()
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
    assert _growth_peak("tesla", 3) == _growth_peak.__wrapped__("tesla", 3)


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
    peaks = {t: _growth_peak("tesla", t) for t in (1, 2, 3, 10)}
    growth = {t: peaks[t] - peaks[1] for t in peaks}
    assert growth == {t: tesla_state_vectors(t) * p for t in peaks}, (growth, p)


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_exact_peak_grows_by_the_states_it_stores(stride):
    """(D3), (D4): from T = 4 to T = 9 the peak of ``exact`` grows by exactly the parameter
    vectors :func:`exact_state_vectors` counts (5, 3, 1 and 2 for k = 1..4), and nothing else:
    the step graph is the same size at every T."""
    p = _state_bytes()
    growth = _growth_peak("exact", 9, stride) - _growth_peak("exact", 4, stride)
    expected = exact_state_vectors(9, stride) - exact_state_vectors(4, stride)
    assert growth == expected * p, (
        f"exact, state_stride={stride}: the peak grew by {growth} B = {growth / p:.3f} "
        f"parameter vectors from T=4 to T=9; its code keeps {expected} more"
    )


def test_unrolled_memory_grows_with_steps():
    short, long = _growth_peak("unrolled", 2), _growth_peak("unrolled", 16)
    assert long >= 3 * short, f"unrolled: peak {long} B at T=16 vs {short} B at T=2"


class _ByAddress(LiveTensorTracker):
    """The tracker as it was keyed before fake tensors: (device, data pointer)."""

    @staticmethod
    def storage_key(storage):
        return (str(storage.device), storage.data_ptr())


@pytest.mark.parametrize("method", list(METHODS))
def test_storage_identity_counts_real_runs_like_data_pointers(method):
    args, kwargs = _problem(method, 3, soft=True, dsa=True)
    peaks = []
    for tracker in (LiveTensorTracker(), _ByAddress()):
        with tracker:
            match_trajectory(*args, **kwargs)
        peaks.append(tracker.peak_bytes)
    assert peaks[0] == peaks[1]


# ----------------------------------------------------------------------------------------------
# predict == measure


def _predict_equals_measure(args, kwargs):
    _, measured = measure_peak_memory(match_trajectory, *args, **kwargs)
    result, predicted = predict_peak_memory(match_trajectory, *args, **kwargs)
    assert predicted.kind == "predicted-live-tensors" and predicted.predicted
    assert not measured.predicted
    assert is_fake(result.images_grad)
    assert predicted.peak_bytes == measured.peak_bytes, (
        f"{kwargs['method']}: predicted {predicted.peak_bytes} B, measured {measured.peak_bytes} B"
    )
    return measured.peak_bytes


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("soft", "dsa"), [(False, False), (True, True)])
def test_predict_equals_measure_for_every_method(method, soft, dsa):
    args, kwargs = _problem(method, 3, soft=soft, dsa=dsa, batch=20)
    _predict_equals_measure(args, kwargs)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(list(METHODS)),
    steps=st.integers(1, 4),
    width=st.sampled_from([2, 3, 5]),
    depth=st.integers(1, 2),
    n=st.integers(2, 12),
    batch_fraction=st.floats(0.1, 1.0),
    soft=st.booleans(),
    dsa=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_predict_equals_measure_property(method, steps, width, depth, n, batch_fraction, soft,
                                         dsa, dtype, seed):
    batch = max(1, round(batch_fraction * n))
    args, kwargs = _problem(method, steps, width=width, depth=depth, n=n, batch=batch, soft=soft,
                            dsa=dsa, dtype=dtype, seed=seed)
    _predict_equals_measure(args, kwargs)


class _MLP(nn.Module):
    """Linear layers only: nothing of ConvNet."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 12), nn.Tanh(),
                                 nn.Linear(12, 4))

    def forward(self, x):
        return self.net(x)


class _BatchNormNet(nn.Module):
    """Train-mode BatchNorm: its running statistics are buffers, which must be faked too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16 * 16, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _state(model):
    return {k: (v.clone(), v) for k, v in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("module", [_MLP, _BatchNormNet])
def test_predict_equals_measure_on_any_module_and_leaves_it_alone(method, module):
    model = module().train()
    args, kwargs = _problem(method, 3, n=10, batch=6, soft=True, model=model)
    before = _state(model)
    _predict_equals_measure(args, kwargs)
    after = model.state_dict(keep_vars=True)
    assert set(after) == set(before)
    for key, (value, obj) in before.items():
        assert after[key] is obj and not is_fake(obj), key  # the caller's own tensors, still real
        assert torch.equal(after[key], value), key
    assert model.training


def test_predict_runs_a_module_itself_with_fake_buffers():
    """A module passed as fn runs on a fake copy: its train-mode BatchNorm updates the copy's
    running statistics, never the caller's."""
    model = _BatchNormNet().train()
    x = torch.randn(8, 3, 16, 16)
    before = _state(model)
    out, predicted = predict_peak_memory(model, x)
    assert is_fake(out) and out.shape == (8, 4)
    for key, (value, _) in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    _, measured = measure_peak_memory(copy.deepcopy(model), x)
    assert predicted.peak_bytes == measured.peak_bytes


def test_meta_tensors_stand_for_cpu_tensors_of_their_shape():
    x = torch.empty(1000, 3, device="meta")
    out, peak = predict_peak_memory(lambda x: x * 2, x)
    assert peak.peak_bytes == 12000 and out.device.type == "cpu" and is_fake(out)


def test_reading_values_under_prediction_is_a_clear_error():
    with pytest.raises(ValueError, match="read tensor values"):
        predict_peak_memory(lambda x: float(x.sum()), torch.ones(3))
    with pytest.raises(TypeError, match="callable"):
        predict_peak_memory(3, torch.ones(3))


def test_peak_memory_stays_backwards_compatible():
    peak = PeakMemory(2**20, "live-tensors")
    assert peak.megabytes == 1.0 and not peak.predicted
    assert PeakMemory(5, "predicted-live-tensors").predicted
    with pytest.raises(AttributeError):
        peak.peak_bytes = 3  # frozen


# ----------------------------------------------------------------------------------------------
# FLOPs


def test_flops_of_a_linear_layer_and_a_convolution():
    _, cost = predict_cost(nn.Linear(5, 7), torch.ones(3, 5))
    assert cost.flops == 2 * 3 * 5 * 7 and cost.flops_by_op == {"addmm": 210}
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
    _, cost = predict_cost(conv, torch.ones(1, 2, 6, 6))
    assert cost.flops == 2 * (6 * 6) * 4 * (2 * 3 * 3)
    assert cost.peak_bytes == 4 * 6 * 6 * 4 and cost.memory.predicted


@pytest.mark.parametrize("method", list(METHODS))
def test_flops_equal_torch_flop_counter_mode_on_a_real_run(method):
    args, kwargs = _problem(method, 2, soft=True, dsa=True, batch=12)
    with FlopCounterMode(display=False) as counter:
        match_trajectory(*args, **kwargs)
    _, cost = predict_cost(match_trajectory, *args, **kwargs)
    assert cost.flops == counter.get_total_flops() > 0
    assert sum(cost.flops_by_op.values()) == cost.flops


# ----------------------------------------------------------------------------------------------
# Sizes in bytes


@pytest.mark.parametrize(("text", "expected"), [
    ("24GiB", 24 * 2**30), ("48GB", 48 * 10**9), ("80e9", 80 * 10**9), ("512MiB", 512 * 2**20),
    ("1.5 TB", 1.5e12), ("48gb", 48 * 10**9), (8e10, 8 * 10**10), ("4096", 4096),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == int(expected)


@pytest.mark.parametrize("text", ["48 gigs", "GB", "-3GB", "0", "1e999", ""])
def test_parse_bytes_refuses_what_it_cannot_read(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)


def test_format_bytes():
    assert format_bytes(512) == "0.5 KiB"
    assert format_bytes(3 * 2**20) == "3.0 MiB"
    assert format_bytes(48e9) == "44.70 GiB"

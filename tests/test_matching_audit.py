"""Matching checks from the test audit (issue 14): float64 identities at 1e-10, the last batch's
exact tesla gradient on every T, and DSA inside ``match_trajectory`` against the reference.

The first three tests supersede, in tests/test_matching.py, ``test_exact_equals_unrolled``,
``test_tesla_equals_first_order_unrolled`` and ``test_all_methods_agree_at_one_step`` (checked at
rtol 1e-7 there); ``test_tesla_is_exact_for_the_last_batch_only`` supersedes
``test_tesla_differs_from_unrolled_for_two_or_more_steps``, whose last-batch check was skipped at
T = 4 and 6 (every image of the last batch had been in an earlier one).

Float64 on tiny nets: over 200 Hypothesis examples the largest difference to the reference was
7e-16 of the largest entry (images), 6e-15 (lr), 2e-15 (labels), so 1e-10 leaves five orders of
magnitude for other CPUs and libraries, and still fails on any real error.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tesla_func import METHODS, ConvNet, match_trajectory
from tesla_func.augment import DSA, FAMILIES
from tesla_func.models import init_params
from tests.reference import unrolled_reference
from tests.test_matching import SETTINGS, matching_cases

RTOL = 1e-10


def assert_close(actual, expected, what):
    """Entry by entry within RTOL of the entry, or of the largest entry (for entries near 0)."""
    if expected is None:
        assert actual is None, f"{what}: expected None"
        return
    torch.testing.assert_close(
        actual.reshape(expected.shape),
        expected,
        rtol=RTOL,
        atol=RTOL * float(expected.abs().max()) + 1e-300,
        msg=lambda m: f"{what}: {m}",
    )


def assert_result_equals(result, reference, method):
    for name, actual, expected in zip(("loss", "images_grad", "labels_grad", "lr_grad"),
                                      result, reference):
        assert_close(actual, expected, f"{method}: {name}")


@SETTINGS
@given(case=matching_cases(), state_stride=st.integers(1, 4))
def test_exact_and_unrolled_equal_the_reference_to_1e10(case, state_stride):
    model, start, target, images, labels, lr, batches, augment = case
    reference = unrolled_reference(model, start, target, images, labels, lr, batches, augment)
    for method in ("unrolled", "exact"):
        result = match_trajectory(model, start, target, images, labels, lr, batches,
                                  method=method, augment=augment, state_stride=state_stride)
        assert_result_equals(result, reference, method)


@SETTINGS
@given(case=matching_cases())
def test_tesla_equals_the_first_order_reference_to_1e10(case):
    model, start, target, images, labels, lr, batches, augment = case
    reference = unrolled_reference(model, start, target, images, labels, lr, batches, augment,
                                   first_order=True)
    result = match_trajectory(model, start, target, images, labels, lr, batches, method="tesla",
                              augment=augment)
    assert_result_equals(result, reference, "tesla")


@SETTINGS
@given(case=matching_cases(min_steps=1, max_steps=1))
def test_all_methods_agree_at_one_step_to_1e10(case):
    model, start, target, images, labels, lr, batches, augment = case
    results = {
        m: match_trajectory(model, start, target, images, labels, lr, batches, method=m,
                            augment=augment)
        for m in METHODS
    }
    for method, result in results.items():
        assert_result_equals(result, results["unrolled"], method)


def _problem(seed=0, channels=1, side=8, n=12, classes=3):
    gen = torch.Generator().manual_seed(seed)
    model = ConvNet(channels=channels, num_classes=classes, image_size=side, width=4,
                    depth=2).double()
    start = {k: v.double() for k, v in init_params(model, gen).items()}
    target = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in start.items()
    }
    images = torch.randn(n, channels, side, side, generator=gen, dtype=torch.float64)
    labels = torch.arange(n) % classes
    return model, start, target, images, labels, torch.tensor(0.1, dtype=torch.float64), gen


@pytest.mark.parametrize("steps", [2, 4, 6])
def test_tesla_is_exact_for_the_last_batch_only(steps):
    """proofs/b_two_pass.md, Eq. B4: the dropped Hessian terms of batch i come from the steps
    after i, so an image that only the last batch uses gets MTT's exact gradient, and the others
    do not. The batches are laid out so that images 9, 10, 11 are in the last batch only, at
    every T (random batches of 6 of 12 images left none at T = 4 and 6)."""
    model, start, target, images, labels, lr, gen = _problem()
    batches = [torch.randperm(9, generator=gen)[:6] for _ in range(steps - 1)]
    batches.append(torch.cat([torch.tensor([9, 10, 11]), torch.randperm(9, generator=gen)[:3]]))
    tesla = match_trajectory(model, start, target, images, labels, lr, batches, method="tesla")
    full = match_trajectory(model, start, target, images, labels, lr, batches, method="unrolled")
    only_last = torch.zeros(12, dtype=torch.bool)
    only_last[9:] = True
    scale = float(full.images_grad.abs().max())
    torch.testing.assert_close(tesla.images_grad[only_last], full.images_grad[only_last],
                               rtol=RTOL, atol=RTOL * scale)
    # The earlier batches' images: far from exact (the truncation, not rounding).
    earlier = tesla.images_grad[~only_last] - full.images_grad[~only_last]
    assert float(earlier.norm() / full.images_grad[~only_last].norm()) > 1e-3
    cosine = float((tesla.images_grad * full.images_grad).sum()
                   / (tesla.images_grad.norm() * full.images_grad.norm()))
    assert cosine < 1 - 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_dsa_inside_matching_equals_the_reference(family):
    """Replayed DSA (one family per test, per-image parameters drawn afresh at every step) as the
    ``augment`` of every method, against the plain-autograd reference that applies the same
    per-step transform in its one graph: the two-pass and adjoint methods, which apply it twice
    per step, must see the very same augmentation (docs/reference.md section 9)."""
    model, start, target, images, _, lr, gen = _problem(seed=1, channels=3, n=10, classes=4)
    labels = torch.randn(10, 4, generator=gen, dtype=torch.float64)  # soft: labels_grad as well
    batches = [torch.randperm(10, generator=gen)[:b] for b in (6, 4, 6)]
    augment = DSA(families=(family,)).replayable([len(b) for b in batches], gen,
                                                 dtype=torch.float64)
    assert not torch.equal(augment(images[batches[0]], 0), images[batches[0]])
    full = unrolled_reference(model, start, target, images, labels, lr, batches, augment)
    first_order = unrolled_reference(model, start, target, images, labels, lr, batches, augment,
                                     first_order=True)
    for method in METHODS:
        result = match_trajectory(model, start, target, images, labels, lr, batches,
                                  method=method, augment=augment, state_stride=2)
        assert_result_equals(result, first_order if method == "tesla" else full, method)
    # Without the augmentation the gradient is another one: the check has something to see.
    plain = match_trajectory(model, start, target, images, labels, lr, batches, method="exact")
    assert not torch.allclose(plain.images_grad, full[1], rtol=1e-3, atol=0)

"""The precision diagnostics of tesla_func.fidelity: one problem solved in float32 and float64
from the same numbers, and the activation sign flips that make a float32 ReLU gradient jump."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from tesla_func.fidelity import (
    Case,
    activation_sign_flips,
    drawn_case,
    precision_errors,
    relative_error,
    with_activation,
)
from tesla_func.models import ConvNetConfig

ARCH = ConvNetConfig(channels=3, num_classes=10, image_size=8, width=4)


def small(activation: str, seed: int = 0, **kw) -> Case:
    return drawn_case(torch.Generator().manual_seed(seed), ARCH, images=10, batch=5, steps=4,
                      families=("crop", "scale"), activation=activation, **kw)


class Cancel(nn.Module):
    """logits = head(relu((x + a) - a)) with a = 1: float32 rounds a tiny x away in x + a, and
    the ReLU then sees 0 where float64 sees x > 0."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(1))
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu((x.flatten(1) + self.a) - self.a))


def test_a_sign_flip_is_counted_and_switches_the_gradient_off():
    model = Cancel()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    target = {k: v + 0.1 for k, v in start.items()}
    images = torch.full((2, 1, 2, 2), 2.0**-30)  # exact in float32 and in float64
    case = Case(model, start, target, images, torch.tensor([0, 1]), 0.1,
                (torch.tensor([0, 1]),), None)
    for method in ("unrolled", "exact"):
        assert activation_sign_flips(case, 1, (method,)) == {method: [8]}  # 2 rows x 4 units
        # float32's ReLU is off at 0: no gradient reaches the images; float64's is on
        error = precision_errors(case.solve(method, torch.float32),
                                 case.solve("unrolled", torch.float64))
        assert error["images_error"] == pytest.approx(1.0)
    far = dataclasses.replace(case, images=images * 2**40)  # 2^10: far from the kink
    assert activation_sign_flips(far, 1) == {"unrolled": [0], "exact": [0]}


def test_the_same_numbers_in_both_precisions():
    case = small("relu")
    args = case.inputs(torch.float64, 2)
    assert len(args["batches"]) == 2 and args["images"].dtype == torch.float64
    assert torch.equal(args["images"].float(), case.images)  # cast up exactly
    reference = case.solve("unrolled", torch.float64)
    same = precision_errors(case.solve("exact", torch.float64), reference)
    assert same["images_error"] < 1e-12 and same["beta_error"] < 1e-10
    assert math.isnan(same["labels_error"])  # class labels have no gradient
    assert relative_error(torch.ones(3), torch.zeros(3)) == math.inf
    assert relative_error(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0])) == pytest.approx(
        math.sqrt(2) / 2)
    soft = small("relu", soft_labels=True)
    assert soft.labels.shape == (10, 10) and soft.labels.argmax(1).tolist() == [
        i % 10 for i in range(10)]
    errors = precision_errors(soft.solve("exact", torch.float32),
                              soft.solve("unrolled", torch.float64))
    assert 0 < errors["labels_error"] < 1e-3


def test_float32_errors_are_rounding_unless_a_relu_input_flipped():
    for seed in range(3):
        relu, smooth = small("relu", seed), small("softplus", seed)
        reference = relu.solve("unrolled", torch.float64)
        for method in ("unrolled", "exact"):
            error = precision_errors(relu.solve(method, torch.float32), reference)
            assert error["images_error"] < 1e-4 or sum(
                activation_sign_flips(relu, 4, (method,))[method]) > 0
        # no kink, no jump: the two methods' float32 errors are rounding of the same size
        reference = smooth.solve("unrolled", torch.float64)
        u, e = (precision_errors(smooth.solve(m, torch.float32), reference)["images_error"]
                for m in ("unrolled", "exact"))
        assert u < 1e-4 and e < 1e-4 and 1 / 3 < e / u < 3


def test_with_activation_swaps_every_relu():
    model = drawn_case(torch.Generator().manual_seed(0), ARCH, images=2, batch=2, steps=1).model
    smooth = with_activation(model, "softplus")
    assert not any(isinstance(m, nn.ReLU) for m in smooth.modules())
    assert sum(isinstance(m, nn.Softplus) for m in smooth.modules()) == ARCH.depth
    assert any(isinstance(m, nn.ReLU) for m in model.modules())  # the original is untouched
    with pytest.raises(ValueError, match="activation"):
        with_activation(model, "gelu")

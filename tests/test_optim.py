"""The one functional optimiser (tesla_func.optim): torch.optim.SGD bit for bit, pure."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tesla_func.optim import sgd


@settings(max_examples=25, deadline=None)
@given(
    lr=st.floats(1e-4, 1.0),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    weight_decay=st.sampled_from([0.0, 5e-4, 0.1]),
    steps=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_sgd_is_torch_sgd_bit_for_bit(lr, momentum, weight_decay, steps, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(3, 4, generator=g, dtype=dtype),
        "b": torch.randn(4, generator=g, dtype=dtype),
    }
    grads = [
        {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in params.items()}
        for _ in range(steps)
    ]
    reference = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.SGD(reference.values(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    optimizer = sgd(momentum, weight_decay)
    state = optimizer.init(params)
    for grad in grads:
        for k, p in reference.items():
            p.grad = grad[k].clone()
        opt.step()
        params, state = optimizer.update(params, grad, state, lr)
    for k, p in reference.items():
        assert torch.equal(params[k], p.detach()), k


def test_update_does_not_mutate_its_inputs():
    optimizer = sgd(momentum=0.9, weight_decay=0.5)
    params, grads = {"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)}
    state = optimizer.init(params)
    new, state = optimizer.update(params, grads, state, 0.1)
    new, state = optimizer.update(new, grads, state, 0.1)
    assert torch.equal(params["w"], torch.ones(3))
    assert torch.equal(grads["w"], torch.full((3,), 2.0))
    assert torch.equal(state.momentum["w"], torch.full((3,), 0.9 * 2.5 + 2.0 + 0.5 * 0.75))


def test_one_rate_per_name():
    optimizer = sgd()
    params = {"a": torch.ones(2), "b": torch.ones(2)}
    grads = {"a": torch.ones(2), "b": torch.ones(2)}
    new, state = optimizer.update(params, grads, optimizer.init(params), {"a": 0.5, "b": 2.0})
    assert torch.equal(new["a"], torch.full((2,), 0.5))
    assert torch.equal(new["b"], torch.full((2,), -1.0))
    assert state.momentum == {}  # no buffers without momentum, as torch.optim.SGD


@pytest.mark.parametrize("kwargs, message", [
    (dict(momentum=1.0), r"momentum must lie in \[0, 1\)"),
    (dict(momentum=-0.1), r"momentum must lie in \[0, 1\)"),
    (dict(weight_decay=float("nan")), "weight_decay must be >= 0"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sgd(**kwargs)

"""DSA: replayable parameters, the transforms each family promises, gradients to the images."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tesla_func.augment import DSA, FAMILIES, DSAParams
from tesla_func.models import ConvNet, ConvNetConfig, init_params


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b=4, c=3, side=8, dtype=torch.float32, seed=1) -> torch.Tensor:
    return torch.randn(b, c, side, side, generator=_gen(seed), dtype=dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_params_give_bitwise_same_output_and_leave_input_alone(family):
    dsa = DSA()
    x = _images()
    version = x._version
    params = dsa.sample(4, _gen(), family=family)
    first, second = dsa.apply(x, params), dsa.apply(x.clone(), params)
    assert torch.equal(first, second)
    assert x._version == version  # nothing written into the input
    # The same generator seed draws the same parameters.
    again = dsa.sample(4, _gen(), family=family)
    assert all(torch.equal(params.values[k], again.values[k]) for k in params.values)


def test_sampling_uses_only_the_given_generator():
    state = torch.random.get_rng_state()
    DSA().replayable([5, 5, 3], _gen(3))
    assert torch.equal(state, torch.random.get_rng_state())


def test_replayable_is_deterministic_per_step_and_differs_between_steps():
    dsa = DSA(families=("rotate",))
    augment = dsa.replayable([4, 4, 2], _gen(7))
    x = _images()
    assert len(augment) == 3
    assert torch.equal(augment(x, 0), augment(x, 0))
    assert not torch.equal(augment(x, 0), augment(x, 1))  # fresh angles for each step
    assert augment(x[:2], 2).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="batch of 2"):
        augment(x, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_of_a_batch_get_the_transforms_drawn_for_them(family):
    """Split a batch anyhow: each part, given its rows' positions, is augmented as in the whole
    (bitwise on CPU: every transform acts on each image alone)."""
    augment = DSA(families=(family,)).replayable([7, 7], _gen(8), dtype=torch.float64)
    x = _images(b=7, side=8, dtype=torch.float64)
    whole = augment(x, 1)
    for rows in (torch.tensor([0, 1, 2]), torch.tensor([6, 3]), torch.arange(7), torch.tensor([5])):
        part = augment(x[rows], 1, rows=rows)
        assert torch.equal(part, whole[rows])
    assert augment.params[1].take(torch.tensor([2, 4])).family == augment.params[1].family


def test_replayed_dsa_follows_the_row_protocol():
    from tesla_func.types import accepts_rows

    augment = DSA().replayable([4, 2], _gen(1))
    assert accepts_rows(augment) and augment.batch_sizes == (4, 2)
    assert not accepts_rows(lambda x, step: x)
    with pytest.raises(TypeError, match="rows must be a 1-D int64"):
        augment.params[0].take(torch.tensor([0.0, 1.0]))


def test_one_family_per_call_drawn_uniformly():
    dsa = DSA()
    g = _gen(11)
    counts = {f: 0 for f in FAMILIES}
    for _ in range(1200):
        counts[dsa.sample(1, g).family] += 1
    # 200 expected each; 5 standard deviations is about 65.
    assert all(abs(c - 200) < 65 for c in counts.values()), counts
    assert DSA(families=("flip",)).sample(3, g).family == "flip"
    with pytest.raises(ValueError, match="families"):
        DSA(families=("blur",))


def test_parameter_ranges_match_the_protocol():
    dsa, g, n = DSA(), _gen(5), 4000
    color = dsa.sample(n, g, family="color").values
    assert -0.5 <= color["brightness"].min() and color["brightness"].max() < 0.5
    assert 0 <= color["saturation"].min() and color["saturation"].max() < 2
    assert 0.5 <= color["contrast"].min() and color["contrast"].max() < 1.5
    scale = dsa.sample(n, g, family="scale").values["scale"]
    assert 1 / 1.2 <= scale.min() and scale.max() <= 1.2 and scale.max() > 1.19
    angle = dsa.sample(n, g, family="rotate").values["angle"]
    assert -15 <= angle.min() and angle.max() <= 15 and angle.abs().max() > 14.9
    flips = dsa.sample(n, g, family="flip").values["flip"].float().mean()
    assert abs(flips - 0.5) < 0.05


def _params(family: str, **values) -> DSAParams:
    b = len(next(iter(values.values())))
    return DSAParams(
        family=family, batch_size=b, values={k: torch.as_tensor(v) for k, v in values.items()}
    )


def test_color_brightness_adds_a_constant_saturation_and_contrast_scale_about_means():
    dsa, x = DSA(), _images(b=2)
    shift = dsa.apply(
        x, _params("color", brightness=[0.3, -0.2], saturation=[1.0, 1.0], contrast=[1.0, 1.0])
    )
    assert torch.allclose(
        shift - x, torch.tensor([0.3, -0.2]).view(2, 1, 1, 1).expand_as(x), atol=1e-6
    )
    grey = dsa.apply(
        x, _params("color", brightness=[0.0, 0.0], saturation=[0.0, 0.0], contrast=[1.0, 1.0])
    )
    assert torch.allclose(grey, x.mean(1, keepdim=True).expand_as(x), atol=1e-6)
    flat = dsa.apply(
        x, _params("color", brightness=[0.0, 0.0], saturation=[1.0, 1.0], contrast=[0.0, 2.0])
    )
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(flat[0], mean[0].expand_as(x[0]), atol=1e-6)
    assert torch.allclose(flat[1], mean[1] + 2 * (x[1] - mean[1]), atol=1e-5)


def test_flip_flips_exactly_the_chosen_images():
    x = _images(b=3)
    out = DSA().apply(x, _params("flip", flip=[True, False, True]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[2], x[2].flip(-1))
    assert torch.equal(out[1], x[1])


def _shifted(img: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Content moved right by dx and down by dy, zeros where nothing comes in."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_crop_shifts_by_whole_pixels_with_zero_fill():
    dsa, x = DSA(), _images(b=64, side=16)
    params = dsa.sample(64, _gen(2), family="crop")
    out = dsa.apply(x, params)
    limit = int(16 * 0.125 + 0.5)  # 2 px
    seen = set()
    for i in range(64):
        matches = [
            (dx, dy)
            for dx in range(-limit, limit + 1)
            for dy in range(-limit, limit + 1)
            if torch.equal(out[i], _shifted(x[i], dx, dy))
        ]
        assert len(matches) == 1, f"image {i} is not an exact whole-pixel shift"
        seen.add(matches[0])
    assert len(seen) >= 20  # of the 25 shifts in range, nearly all occur


def test_cutout_zeroes_one_square_of_half_the_side():
    dsa = DSA()
    x = _images(b=1, side=8).abs() + 1  # no zeros of its own
    centre = torch.tensor([[0.5, 0.5]])  # -> pixel (4, 4): square rows/cols 2..5
    out = dsa.apply(x, DSAParams("cutout", 1, {"centre": centre}))
    hole = out == 0
    assert hole.sum() == 3 * 16
    assert hole[0, :, 2:6, 2:6].all()
    assert torch.equal(out[~hole], x[~hole])
    corner = dsa.apply(x, DSAParams("cutout", 1, {"centre": torch.zeros(1, 2)}))
    assert (corner == 0).sum() == 3 * 4 * 4 / 4  # clipped at the border: a 2x2 quarter


def test_identity_scale_and_rotation_and_a_quarter_turn():
    dsa, x = DSA(), _images(b=2, side=9)
    same = dsa.apply(x, _params("scale", scale=[[1.0, 1.0], [1.0, 1.0]]))
    assert torch.allclose(same, x, atol=1e-5)
    assert torch.allclose(dsa.apply(x, _params("rotate", angle=[0.0, 0.0])), x, atol=1e-5)
    turned = dsa.apply(x, _params("rotate", angle=[90.0, -90.0]))
    # kornia's positive angle turns the array clockwise as displayed (rows down); the range is
    # symmetric, so the convention changes no distribution.
    assert torch.allclose(turned[0], torch.rot90(x[0], k=-1, dims=(-2, -1)), atol=1e-4)
    assert torch.allclose(turned[1], torch.rot90(x[1], k=1, dims=(-2, -1)), atol=1e-4)
    # Scale 2 about the centre: the centre pixel stays, a pixel 1 step right comes from 0.5 right.
    big = dsa.apply(x, _params("scale", scale=[[2.0, 2.0], [2.0, 2.0]]))
    assert torch.allclose(big[..., 4, 4], x[..., 4, 4], atol=1e-5)
    assert torch.allclose(big[..., 4, 6], x[..., 4, 5], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_to_images_matches_finite_differences(family):
    dsa = DSA()
    params = dsa.sample(2, _gen(4), dtype=torch.float64, family=family)
    x = _images(b=2, c=2, side=6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, params), (x,))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 5), steps=st.integers(1, 3))
def test_works_inside_torch_func_grad_and_vjp(seed, batch, steps):
    """The matching contract: augment(x, step) inside grad/vjp, replayed, same as plain autograd."""
    cfg = ConvNetConfig(channels=3, image_size=8, width=4, num_classes=3)
    model = ConvNet(cfg).double()
    params = {k: v.double() for k, v in init_params(model, _gen(seed)).items()}
    augment = DSA().replayable([batch] * steps, _gen(seed + 1), dtype=torch.float64)
    x = _images(b=batch, side=8, dtype=torch.float64, seed=seed)

    def loss(images, step):
        logits = functional_call(model, params, (augment(images, step),), strict=True)
        return logits.square().mean()

    for step in range(steps):
        g_func = torch.func.grad(loss)(x, step)
        leaf = x.clone().requires_grad_()
        (g_ref,) = torch.autograd.grad(loss(leaf, step), leaf)
        assert torch.allclose(g_func, g_ref, rtol=1e-10, atol=1e-12)
        out, pullback = torch.func.vjp(lambda t, step=step: augment(t, step), x)
        (g_vjp,) = pullback(torch.ones_like(out))
        (g_ref2,) = torch.autograd.grad(augment(leaf, step).sum(), leaf)
        assert torch.allclose(g_vjp, g_ref2, rtol=1e-10, atol=1e-12)


class _ElementsWritten(TorchDispatchMode):
    """Counts the elements of every tensor ATen operators return: a deterministic measure of the
    memory traffic of a call (the same on every run and machine), which wall time is not."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.elements += sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def _elements_written(fn) -> int:
    with _ElementsWritten() as counter:
        fn()
    return counter.elements


def test_dsa_costs_less_than_the_network_step_it_augments():
    """DSA apply on a (100, 3, 32, 32) batch writes a small fraction of the elements that one
    ConvNet width-32 forward + backward on it writes (counted, not timed: wall time on a shared
    machine is noise; time DSA against the network in a benchmark, not in a test). Every family
    is a few elementwise or sampling passes over the batch; the network's first block alone
    writes 100 x 32 x 32 x 32 elements a pass."""
    dsa, x = DSA(), _images(b=100, side=32)
    model = ConvNet(ConvNetConfig(channels=3, image_size=32, width=32))
    y = torch.randint(0, 10, (100,), generator=_gen())

    def step():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    net = _elements_written(step)
    cost = {f: _elements_written(lambda f=f, i=i: dsa.apply(x, dsa.sample(100, _gen(i), family=f)))
            for i, f in enumerate(FAMILIES)}
    print(f"\nnetwork fwd+bwd {net:,} elements written; DSA apply " +
          ", ".join(f"{f} {n:,}" for f, n in cost.items()))
    assert all(0 < n < net / 5 for n in cost.values()), (net, cost)

"""Transfer architectures and the model registry (tesla_func.models)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, vmap

from tesla_func.models import (
    ARCHITECTURES,
    ConvNet,
    ResNet18,
    ViT,
    ViTConfig,
    build_model,
    init_params,
    num_params,
    params_of,
)

# Small instances of every registered architecture: (kwargs, channels, image size).
SMALL = {
    "convnet": ({"width": 8}, 3, 32),
    "convnetd4": ({"width": 8}, 1, 32),
    "resnet18": ({"width": 4}, 3, 16),
    "vit": ({"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32}, 1, 16),
}


def test_every_architecture_has_a_small_instance():
    assert set(SMALL) == set(ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_output_shape(name):
    kw, channels, side = SMALL[name]
    model = build_model(name, channels, 7, side, **kw)
    out = model(torch.randn(5, channels, side, side))
    assert out.shape == (5, 7)
    assert torch.isfinite(out).all()


def test_convnet_default_parameter_count():
    assert num_params(params_of(ConvNet())) == 320_010
    assert num_params(params_of(build_model("convnet", 3, 10, 32))) == 320_010


def test_convnet_width_is_overridable():
    small = build_model("convnet", 3, 10, 32, width=16)
    assert small.config.width == 16 and small.config.depth == 3
    assert build_model("convnetd4", 3, 10, 64).config.depth == 4


def test_resnet18_parameter_count_is_the_standard_one():
    # The CIFAR ResNet-18 with 10 classes; GroupNorm and BatchNorm have the same affine count.
    assert num_params(params_of(ResNet18())) == 11_173_962
    assert num_params(params_of(build_model("resnet18", 3, 10, 32, norm="batch"))) == 11_173_962


def _vit_count(c: ViTConfig) -> int:
    d, m = c.dim, c.mlp_dim
    patch = c.channels * c.patch_size**2 * d + d
    tokens = d + (c.num_patches + 1) * d
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    return patch + tokens + c.depth * block + 2 * d + d * c.num_classes + c.num_classes


@settings(max_examples=12, deadline=None)
@given(
    patch=st.sampled_from([2, 4]),
    patches_per_side=st.integers(1, 4),
    heads=st.sampled_from([1, 2]),
    depth=st.integers(1, 2),
    pool=st.sampled_from(["cls", "mean"]),
    batch=st.integers(1, 3),
)
def test_vit_shapes_and_parameter_count(patch, patches_per_side, heads, depth, pool, batch):
    side = patch * patches_per_side
    cfg = ViTConfig(
        channels=2,
        num_classes=3,
        image_size=side,
        patch_size=patch,
        dim=8 * heads,
        depth=depth,
        heads=heads,
        mlp_dim=12,
        pool=pool,
    )
    model = ViT(cfg)
    assert num_params(params_of(model)) == _vit_count(cfg)
    assert model(torch.randn(batch, 2, side, side)).shape == (batch, 3)


def test_build_model_leaves_global_rng_alone():
    state = torch.get_rng_state()
    build_model("vit", 3, 10, 32)
    assert torch.equal(state, torch.get_rng_state())


def test_init_params_redraws_vit_tokens():
    model = build_model("vit", 1, 10, 16, dim=16, depth=1, heads=2)
    a = init_params(model, torch.Generator().manual_seed(1))
    b = init_params(model, torch.Generator().manual_seed(2))
    again = init_params(model, torch.Generator().manual_seed(1))
    for key in ("tokens.cls", "tokens.pos"):
        assert not torch.equal(a[key], b[key])
        assert torch.equal(a[key], again[key])
    assert set(a) == set(params_of(model))


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_functional_vmap_matches_per_model_calls(name):
    # The vmap evaluation engine runs transfer models through functional_call on stacked params.
    kw, channels, side = SMALL[name]
    model = build_model(name, channels, 4, side, **kw).double()
    inits = [init_params(model, torch.Generator().manual_seed(k)) for k in range(2)]
    stacked = {k: torch.stack([p[k] for p in inits]) for k in inits[0]}
    x = torch.randn(3, channels, side, side, dtype=torch.float64)
    together = vmap(lambda p: functional_call(model, p, (x,), strict=True))(stacked)
    for k, p in enumerate(inits):
        torch.testing.assert_close(together[k], functional_call(model, p, (x,), strict=True))


def test_batch_norm_models_have_buffers_and_instance_norm_ones_do_not():
    assert list(build_model("resnet18", 3, 10, 16, width=4, norm="batch").buffers())
    assert not list(build_model("resnet18", 3, 10, 16, width=4).buffers())
    assert not list(build_model("vit", 3, 10, 16, dim=16, depth=1).buffers())


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: build_model("resnet50", 3, 10, 32), ValueError, "unknown architecture"),
        (lambda: build_model("vit", 3, 10, 32, depht=2), TypeError, "'vit'"),
        (lambda: build_model("vit", 3, 10, 30), ValueError, "multiple of patch_size"),
        (lambda: build_model("vit", 3, 10, 32, dim=130, heads=4), ValueError, "multiple of heads"),
        (lambda: build_model("vit", 3, 10, 32, pool="max"), ValueError, "pool"),
        (lambda: build_model("resnet18", 3, 10, 8), ValueError, "too small for instance norm"),
        (lambda: build_model("resnet18", 0, 10, 32), ValueError, "channels"),
        (lambda: build_model("resnet18", 3, 10, 32, norm="layer"), ValueError, "norm"),
        (lambda: build_model("convnet", 3, 10, 4), ValueError, "too small"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, words):
    with pytest.raises(error, match=words):
        call()


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_wrong_input_shape_is_named(name):
    kw, channels, side = SMALL[name]
    model = build_model(name, channels, 10, side, **kw)
    with pytest.raises(ValueError, match=rf"\(B, {channels}, {side}, {side}\)"):
        model(torch.randn(2, channels, side + 4, side + 4))

"""Network skeletons for trajectory matching, defined once.

A model object here is only a *skeleton*: it fixes the architecture and the parameter names.
The values that matter (expert checkpoints, student states) live in ``dict[str, Tensor]`` and are
run through :func:`torch.func.functional_call`, so one module serves every expert and every student
step without copying modules around.

ConvNet is the field's standard network (DC / DSA / MTT / TESLA): ``depth`` blocks of
conv3x3(pad 1) -> norm -> ReLU -> pool 2x2, then one Linear layer to the classes.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Norm = Literal["instance", "batch", "none"]
Pool = Literal["avg", "max", "none"]
NORMS: tuple[str, ...] = ("instance", "batch", "none")
POOLS: tuple[str, ...] = ("avg", "max", "none")


@dataclass(frozen=True)
class ConvNetConfig:
    """Architecture of a ConvNet; saved beside every checkpoint so loading can check it."""

    channels: int = 3  # input channels C
    num_classes: int = 10  # K
    image_size: int = 32  # input side H = W, pixels
    width: int = 128  # feature maps per conv layer
    depth: int = 3  # conv blocks
    norm: Norm = "instance"  # instance = GroupNorm(groups=width), affine; batch; none
    pool: Pool = "avg"  # 2x2 pooling after every block

    def __post_init__(self) -> None:
        for name in ("channels", "num_classes", "image_size", "width", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ConvNetConfig.{name} must be a positive int, got {value!r}")
        if self.norm not in NORMS:
            raise ValueError(f"ConvNetConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.pool not in POOLS:
            raise ValueError(f"ConvNetConfig.pool must be one of {POOLS}, got {self.pool!r}")
        if self.pool != "none" and self.image_size < 2**self.depth:
            raise ValueError(
                f"image_size {self.image_size} is too small for depth {self.depth} with pooling: "
                f"each block halves the side, so it needs image_size >= {2**self.depth}"
            )

    @property
    def feature_side(self) -> int:
        """Side of the last feature map: the input side halved once per pooled block."""
        return self.image_size // 2**self.depth if self.pool != "none" else self.image_size

    def to_dict(self) -> dict:
        return asdict(self)


def _norm_layer(norm: str, width: int) -> nn.Module:
    if norm == "instance":
        # Instance norm as the field writes it: GroupNorm with one group per channel, affine.
        # It has no running statistics, so a functional student step has no state to carry.
        return nn.GroupNorm(width, width, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(width)
    return nn.Identity()


def _pool_layer(pool: str) -> nn.Module:
    if pool == "avg":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    if pool == "max":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    return nn.Identity()


class ConvNet(nn.Module):
    """ConvNet-``depth``: (B, C, H, W) images -> (B, K) logits.

    Each block is ``conv3x3(pad=1) -> norm -> ReLU -> pool(2x2)``; the classifier is one Linear
    layer on the flattened (width * side * side) features. With the defaults (depth 3, width 128,
    32x32x3 inputs, 10 classes) it has 320,010 parameters, as in MTT and TESLA.
    """

    def __init__(self, config: ConvNetConfig | None = None, **overrides) -> None:
        super().__init__()
        if config is None:
            config = ConvNetConfig(**overrides)
        elif overrides:
            config = ConvNetConfig(**{**config.to_dict(), **overrides})
        self.config = config
        blocks = []
        in_channels = config.channels
        for _ in range(config.depth):
            blocks += [
                nn.Conv2d(in_channels, config.width, kernel_size=3, padding=1),
                _norm_layer(config.norm, config.width),
                nn.ReLU(inplace=False),
                _pool_layer(config.pool),
            ]
            in_channels = config.width
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(config.width * config.feature_side**2, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        if x.dim() != 4 or x.shape[1:] != (c.channels, c.image_size, c.image_size):
            raise ValueError(
                f"ConvNet expects images of shape (B, {c.channels}, {c.image_size}, "
                f"{c.image_size}), got {tuple(x.shape)}"
            )
        h = self.features(x)  # (B, width, side, side)
        return self.classifier(h.flatten(1))  # (B, K)


def convnet_d3(channels: int = 3, num_classes: int = 10, image_size: int = 32, **kw) -> ConvNet:
    """ConvNet depth 3, width 128, instance norm: the standard for 28-32 px inputs."""
    return ConvNet(ConvNetConfig(channels, num_classes, image_size, **{"width": 128, **kw}))


def convnet_d4(channels: int = 3, num_classes: int = 10, image_size: int = 64, **kw) -> ConvNet:
    """ConvNetD4: depth 4, width 128, for 64x64 inputs (Tiny/downsampled ImageNet)."""
    return ConvNet(
        ConvNetConfig(channels, num_classes, image_size, **{"width": 128, "depth": 4, **kw})
    )


def init_params(model: nn.Module, generator: torch.Generator) -> dict[str, Tensor]:
    """Fresh parameters for ``model`` drawn from ``generator`` (the module is left untouched).

    Uses each layer's own ``reset_parameters`` (so the init is PyTorch's default for that layer)
    on a private copy of the skeleton. The layers draw from the global RNG, so it is forked and
    seeded from ``generator`` inside this call: nothing outside it is disturbed.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters") and module is not fresh:
                module.reset_parameters()
    return {name: p.detach().clone() for name, p in fresh.named_parameters()}


def params_of(model: nn.Module) -> dict[str, Tensor]:
    """The module's own parameters as a detached name -> tensor dict (copies, safe to modify)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def num_params(params: dict[str, Tensor]) -> int:
    return sum(t.numel() for t in params.values())

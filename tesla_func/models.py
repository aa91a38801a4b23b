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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from tesla_func.configargs import check_int

Norm = Literal["instance", "batch", "none"]
Pool = Literal["avg", "max", "none"]
NORMS: tuple[str, ...] = ("instance", "batch", "none")
POOLS: tuple[str, ...] = ("avg", "max", "none")


def _merge_config(cls: type, config: object | None, overrides: dict) -> object:
    """``config`` (or the defaults of ``cls``) with ``overrides`` applied."""
    if config is None:
        return cls(**overrides)
    return cls(**{**config.to_dict(), **overrides}) if overrides else config


def _check_input(name: str, x: Tensor, channels: int, image_size: int) -> None:
    if x.dim() != 4 or x.shape[1:] != (channels, image_size, image_size):
        raise ValueError(
            f"{name} expects images of shape (B, {channels}, {image_size}, {image_size}), "
            f"got {tuple(x.shape)}"
        )


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
        check_int(self, "channels", "num_classes", "image_size", "width", "depth")
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
        config = _merge_config(ConvNetConfig, config, overrides)
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
        _check_input("ConvNet", x, self.config.channels, self.config.image_size)
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


# --------------------------------------------------------------------------------------------------
# Transfer architectures: the networks a distilled set is *evaluated* on besides the one it was
# distilled with (the paper's cross-architecture table uses ResNet-18 and ViT).


@dataclass(frozen=True)
class ResNetConfig:
    """Architecture of a small-image (CIFAR-style) ResNet-18."""

    channels: int = 3  # input channels C
    num_classes: int = 10  # K
    image_size: int = 32  # input side H = W, pixels
    width: int = 64  # channels of the first stage; the stages use width * (1, 2, 4, 8)
    norm: Norm = "instance"  # instance = GroupNorm(groups=channels), affine; batch; none

    def __post_init__(self) -> None:
        check_int(self, "channels", "num_classes", "image_size", "width")
        if self.norm not in NORMS:
            raise ValueError(f"ResNetConfig.norm must be one of {NORMS}, got {self.norm!r}")
        # Three stride-2 stages shrink the side to ceil(side / 8). Instance norm over a 1x1 map
        # normalises a single value to zero, which silently kills the last stage.
        if self.norm == "instance" and self.image_size < 16:
            raise ValueError(
                f"ResNetConfig.image_size {self.image_size} is too small for instance norm: the "
                "last stage would see a 1x1 map (needs image_size >= 16)"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class _BasicBlock(nn.Module):
    """Two conv3x3 -> norm layers with a residual; a 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"  # a norm layer's own shift makes a conv bias redundant
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm_layer(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=bias)
        self.norm2 = _norm_layer(norm, planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=bias), _norm_layer(norm, planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return torch.relu(h + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images: (B, C, H, W) -> (B, K) logits.

    3x3 stride-1 stem (no max-pool), four stages of two BasicBlocks with ``width * (1, 2, 4, 8)``
    channels (stride 1, 2, 2, 2), global average pooling, one Linear layer. With the defaults
    (width 64, 3x32x32, 10 classes) it has 11,173,962 parameters, as the usual CIFAR ResNet-18.
    """

    def __init__(self, config: ResNetConfig | None = None, **overrides) -> None:
        super().__init__()
        config = _merge_config(ResNetConfig, config, overrides)
        self.config = config
        w, norm = config.width, config.norm
        self.stem = nn.Sequential(
            nn.Conv2d(config.channels, w, 3, stride=1, padding=1, bias=norm == "none"),
            _norm_layer(norm, w),
            nn.ReLU(inplace=False),
        )
        stages, in_planes = [], w
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = w * 2**i
            stages += [
                _BasicBlock(in_planes, planes, stride, norm),
                _BasicBlock(planes, planes, 1, norm),
            ]
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(in_planes, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _check_input("ResNet18", x, self.config.channels, self.config.image_size)
        h = self.stages(self.stem(x))  # (B, 8 * width, ceil(H / 8), ceil(W / 8))
        return self.classifier(h.mean(dim=(2, 3)))  # (B, K)


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a small Vision Transformer for 28-32 px inputs."""

    channels: int = 3  # input channels C
    num_classes: int = 10  # K
    image_size: int = 32  # input side H = W, pixels; must be a multiple of patch_size
    patch_size: int = 4  # side of a square patch, pixels: 32 px -> 8 x 8 = 64 tokens
    dim: int = 128  # token width
    depth: int = 6  # transformer blocks
    heads: int = 4  # attention heads; dim must be a multiple of heads
    mlp_dim: int = 256  # hidden width of each block's MLP
    pool: Literal["cls", "mean"] = "cls"  # classify the cls token, or the mean of patch tokens

    def __post_init__(self) -> None:
        check_int(self, "channels", "num_classes", "image_size", "patch_size", "dim", "depth",
                  "heads", "mlp_dim")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.image_size {self.image_size} is not a multiple of patch_size "
                f"{self.patch_size}"
            )
        if self.dim % self.heads:
            raise ValueError(f"ViTConfig.dim {self.dim} is not a multiple of heads {self.heads}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"ViTConfig.pool must be 'cls' or 'mean', got {self.pool!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


class _Tokens(nn.Module):
    """The learned cls token and position embeddings, in a layer of their own so that
    :func:`init_params` (which calls each layer's ``reset_parameters``) re-draws them too."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.empty(1, 1, dim))
        self.pos = nn.Parameter(torch.empty(1, num_tokens, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, patches: Tensor) -> Tensor:
        """(B, N, D) patch tokens -> (B, N + 1, D) with the cls token first, positions added."""
        cls = self.cls.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos


class _Attention(nn.Module):
    """Multi-head self-attention written out (plain matmuls work under vmap and in float64)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, d_head)
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        out = (att @ v).transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        return self.proj(out)


class _TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer: (B, C, H, W) -> (B, K) logits.

    Non-overlapping ``patch_size`` patches embedded by a strided conv, a cls token and learned
    position embeddings, ``depth`` pre-norm transformer blocks, a final LayerNorm and a Linear
    head on the cls token (or on the mean patch token). No dropout, so it is deterministic and
    runs under ``vmap`` without a randomness policy.
    """

    def __init__(self, config: ViTConfig | None = None, **overrides) -> None:
        super().__init__()
        config = _merge_config(ViTConfig, config, overrides)
        self.config = config
        c = config
        self.patch = nn.Conv2d(c.channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.tokens = _Tokens(c.num_patches + 1, c.dim)
        self.blocks = nn.Sequential(
            *[_TransformerBlock(c.dim, c.heads, c.mlp_dim) for _ in range(c.depth)]
        )
        self.norm = nn.LayerNorm(c.dim)
        self.classifier = nn.Linear(c.dim, c.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _check_input("ViT", x, self.config.channels, self.config.image_size)
        patches = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, D)
        h = self.norm(self.blocks(self.tokens(patches)))  # (B, N + 1, D)
        pooled = h[:, 0] if self.config.pool == "cls" else h[:, 1:].mean(dim=1)  # (B, D)
        return self.classifier(pooled)  # (B, K)


def resnet18(channels: int = 3, num_classes: int = 10, image_size: int = 32, **kw) -> ResNet18:
    """CIFAR-style ResNet-18 (width 64, instance norm unless ``norm=`` says otherwise)."""
    return ResNet18(ResNetConfig(channels, num_classes, image_size, **kw))


def vit(channels: int = 3, num_classes: int = 10, image_size: int = 32, **kw) -> ViT:
    """Small ViT (patch 4, dim 128, depth 6, 4 heads) for 28-32 px inputs."""
    return ViT(ViTConfig(channels, num_classes, image_size, **kw))


# name -> builder(channels, num_classes, image_size, **kw) -> nn.Module
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "convnet": convnet_d3,
    "convnetd4": convnet_d4,
    "resnet18": resnet18,
    "vit": vit,
}


def build_model(name: str, channels: int, num_classes: int, image_size: int, **kw) -> nn.Module:
    """The skeleton of architecture ``name`` from :data:`ARCHITECTURES`.

    ``kw`` goes to the architecture's config (e.g. ``width=32`` for 'convnet', ``norm='batch'``,
    ``depth=4`` for 'vit'). Construction runs on a forked global RNG, so building a skeleton
    leaves the caller's random stream untouched; draw real initial values with
    :func:`init_params`.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    with torch.random.fork_rng(devices=[]):
        try:
            return ARCHITECTURES[name](channels, num_classes, image_size, **kw)
        except TypeError as err:  # an unknown keyword: say which architecture did not take it
            raise TypeError(
                f"architecture {name!r} does not accept these arguments: {err}"
            ) from err

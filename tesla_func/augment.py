"""Differentiable Siamese Augmentation (DSA), replayable: sample parameters once, apply them often.

The two-pass and adjoint gradients recompute each student step, so step i must see the very same
augmented minibatch in every pass (docs/reference.md section 9: with fresh draws in the second
pass, the gradient is that of no single augmented loss). Hence two steps, as kornia does with
``forward_parameters`` / ``params=``:

    params = dsa.sample(batch_size, generator)   # all randomness, drawn from an explicit generator
    y = dsa.apply(x, params)                     # pure tensor ops: same params -> same y, bitwise

``apply`` draws nothing, calls no ``.item()`` and never writes into ``x``, so it runs inside
``torch.func.grad`` / ``vjp`` and gradients reach the images.

Every transform acts on each image alone, so part of a batch can be augmented by itself with the
parameters of its own rows (``params.take(rows)``): ``apply(x[rows], params.take(rows))`` equals
``apply(x, params)[rows]``. :class:`ReplayedDSA` offers this as ``augment(x, step, rows=rows)``
(the :class:`~tesla_func.types.RowAugment` protocol), which a matching call whose minibatches are
split (into microbatches, or over ranks) uses: the family stays the step's, drawn once for the
whole minibatch.

Families and ranges (docs/reference.md section 5, as in the DSA code's
``color_crop_cutout_flip_scale_rotate`` strategy), with per-sample parameters u ~ U[0, 1):

=========  ==========================================================================
family     transform of one image x (C, H, W), values in the normalised space
=========  ==========================================================================
color      brightness x + (u1 - 0.5); then saturation m_c + (x - m_c) * 2 u2 with m_c the
           per-pixel channel mean; then contrast m + (x - m) * (u3 + 0.5) with m the image mean
crop       shift by integers (dx, dy), each uniform in [-round(side/8), round(side/8)], zero fill
cutout     zero a square of side round(side/2) whose centre is uniform over the image (clipped
           at the border)
flip       horizontal flip with probability 0.5
scale      stretch by (sx, sy), each uniform in [1/1.2, 1.2], about the centre, zero fill
rotate     rotate by an angle uniform in [-15, 15] degrees about the centre, zero fill
=========  ==========================================================================

Which family: like the reference DSA in its default mode ("S"), every ``sample`` call draws one
family uniformly for the whole batch, and per-sample parameters within it. One call per training
step, so over a run every family is used about equally.

Geometry runs through kornia (``warp_affine``, ``get_affine_matrix2d``, ``hflip``) in pixel
coordinates with ``align_corners=True``; crop uses nearest sampling so integer shifts move pixels
exactly. Scale here stretches the *content* by (sx, sy) (kornia's forward convention); the
reference stretches the sampling grid instead, i.e. the inverse factor -- the range is symmetric
under inversion only up to the uniform density, which no result depends on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

FAMILIES: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAParams:
    """Pre-drawn parameters of one augmentation call: one family, per-sample tensors.

    ``values`` by family (B = batch size):
    color: brightness (B,), saturation (B,), contrast (B,) -- the u's of the table above;
    crop: shift (B, 2) integer pixels (dx, dy); cutout: centre (B, 2) integer pixels (x, y);
    flip: flip (B,) bool; scale: scale (B, 2) factors (sx, sy); rotate: angle (B,) degrees.
    """

    family: str
    batch_size: int
    values: Mapping[str, Tensor] = field(default_factory=dict)

    def take(self, rows: Tensor) -> DSAParams:
        """The parameters of positions ``rows`` (n,) of this batch, in that order (same family)."""
        if rows.dim() != 1 or rows.dtype != torch.long:
            raise TypeError(f"rows must be a 1-D int64 tensor of positions, got {rows.dtype} "
                            f"of shape {tuple(rows.shape)}")
        values = {k: v[rows.to(v.device)] for k, v in self.values.items()}
        return DSAParams(family=self.family, batch_size=rows.shape[0], values=values)


@dataclass(frozen=True)
class DSA:
    """DSA with the reference ranges; each field is one family's range (units in comments)."""

    families: tuple[str, ...] = FAMILIES  # one is drawn per call
    brightness: float = 1.0  # additive shift in [-b/2, b/2]
    saturation: float = 2.0  # factor in [0, s)
    contrast: float = 0.5  # factor in [1 - c, 1 + c)
    crop: float = 0.125  # max shift, fraction of the side
    cutout: float = 0.5  # square side, fraction of the image side
    flip: float = 0.5  # probability of a horizontal flip
    scale: float = 1.2  # factors in [1/scale, scale]
    rotate: float = 15.0  # max angle, degrees

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(
                f"DSA families must be a non-empty subset of {FAMILIES}, got {self.families!r}"
            )

    # -- randomness ---------------------------------------------------------------------------

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        family: str | None = None,
    ) -> DSAParams:
        """Draw one call's parameters for ``batch_size`` images from ``generator`` only.

        ``family`` forces a family (tests, ablations); by default one is drawn from ``families``.
        Draws happen on the generator's device and are then moved to ``device``.
        """
        g = generator
        on = g.device

        def u(*shape: int) -> Tensor:  # U[0, 1)
            return torch.rand(shape, generator=g, device=on, dtype=torch.float64)

        def ints(low: int, high: int, *shape: int) -> Tensor:  # uniform integers in [low, high)
            return torch.randint(low, high, shape, generator=g, device=on)

        if family is None:
            family = self.families[int(ints(0, len(self.families), 1)[0])]
        elif family not in FAMILIES:
            raise ValueError(f"unknown DSA family {family!r}; known: {FAMILIES}")
        b = batch_size
        if family == "color":
            values = {
                "brightness": (u(b) - 0.5) * self.brightness,
                "saturation": u(b) * self.saturation,
                "contrast": u(b) * 2 * self.contrast + (1 - self.contrast),
            }
        elif family == "crop":
            # The image side is only known in apply: draw u per axis here, map it to a whole
            # pixel shift there (uniform over the integers in range, as the reference).
            values = {"shift": u(b, 2)}
        elif family == "cutout":
            values = {"centre": u(b, 2)}  # mapped to whole pixels in apply, like crop
        elif family == "flip":
            values = {"flip": u(b) < self.flip}
        elif family == "scale":
            lo = 1.0 / self.scale
            values = {"scale": lo + u(b, 2) * (self.scale - lo)}
        else:  # rotate
            values = {"angle": (u(b) * 2 - 1) * self.rotate}
        cast = {
            k: v.to(device=device) if v.dtype == torch.bool else v.to(device=device, dtype=dtype)
            for k, v in values.items()
        }
        return DSAParams(family=family, batch_size=b, values=cast)

    # -- the pure part ------------------------------------------------------------------------

    def apply(self, x: Tensor, params: DSAParams) -> Tensor:
        """Augment (B, C, H, W) ``x`` with pre-drawn ``params``: pure, differentiable in ``x``."""
        if x.dim() != 4 or x.shape[0] != params.batch_size:
            raise ValueError(
                f"DSA params are for a batch of {params.batch_size} (B, C, H, W) "
                f"images, got {tuple(x.shape)}"
            )
        # Follow x's device and float dtype (no-ops when they already match; masks stay bool).
        v = {
            k: t.to(x.device) if t.dtype == torch.bool else t.to(device=x.device, dtype=x.dtype)
            for k, t in params.values.items()
        }
        return _APPLY[params.family](self, x, v)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Sample and apply in one go (training on real batches, where nothing is replayed)."""
        return self.apply(x, self.sample(x.shape[0], generator, device=x.device, dtype=x.dtype))

    def replayable(
        self,
        batch_sizes: Sequence[int],
        generator: torch.Generator,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> ReplayedDSA:
        """Pre-draw the parameters of T steps (step i sees ``batch_sizes[i]`` images).

        Returns the ``augment(x, step) -> x`` callable that ``match_trajectory(augment=...)``
        takes: deterministic per step, safe inside torch.func transforms.
        """
        params = tuple(self.sample(b, generator, dtype=dtype) for b in batch_sizes)
        return ReplayedDSA(dsa=self, params=_moved(params, device))


@dataclass(frozen=True)
class ReplayedDSA:
    """``(x, step, rows=None) -> x``: applies the parameters drawn for ``step``, the same each call.

    A :class:`~tesla_func.types.RowAugment`: with ``rows`` (n,), ``x`` holds n rows of the step's
    minibatch, at those positions, and gets their transforms (``DSAParams.take``).
    """

    dsa: DSA
    params: tuple[DSAParams, ...]  # one per step

    def __call__(self, x: Tensor, step: int, *, rows: Tensor | None = None) -> Tensor:
        params = self.params[step]
        return self.dsa.apply(x, params if rows is None else params.take(rows))

    def __len__(self) -> int:
        return len(self.params)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The minibatch size each step's parameters were drawn for (checked by the matching)."""
        return tuple(p.batch_size for p in self.params)


def _moved(params: tuple[DSAParams, ...], device: torch.device | str | None
           ) -> tuple[DSAParams, ...]:
    """The draws of every step moved to ``device`` together: one copy per dtype instead of one
    per tensor (a host-to-device copy waits for the queued kernels on CUDA: T of them per
    iteration otherwise). The same values as moving them one by one."""
    flat = [(i, k, v) for i, p in enumerate(params) for k, v in p.values.items()]
    if device is None or all(v.device == torch.device(device) for *_, v in flat):
        return params
    moved: dict[tuple[int, str], Tensor] = {}
    for dtype in {v.dtype for *_, v in flat}:
        group = [(i, k, v) for i, k, v in flat if v.dtype == dtype]
        parts = torch.cat([v.reshape(-1) for *_, v in group]).to(device)
        for (i, k, v), part in zip(group, parts.split([v.numel() for *_, v in group])):
            moved[i, k] = part.view(v.shape)
    return tuple(DSAParams(p.family, p.batch_size, {k: moved[i, k] for k in p.values})
                 for i, p in enumerate(params))


# ----------------------------------------------------------------------------------------------
# One function per family: (dsa, x (B, C, H, W), values) -> (B, C, H, W)
# ----------------------------------------------------------------------------------------------


def _per_sample(t: Tensor) -> Tensor:
    return t.view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1), broadcasts over C, H, W


def _color(dsa: DSA, x: Tensor, v: Mapping[str, Tensor]) -> Tensor:
    x = x + _per_sample(v["brightness"])
    mean_c = x.mean(dim=1, keepdim=True)  # (B, 1, H, W): saturation pulls towards grey
    x = mean_c + (x - mean_c) * _per_sample(v["saturation"])
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return mean + (x - mean) * _per_sample(v["contrast"])


def _warp(x: Tensor, matrix: Tensor, mode: str = "bilinear") -> Tensor:
    """kornia warp with a (B, 2, 3) pixel-space matrix, zero fill outside the image."""
    # kornia is imported where used: it costs 0.3 s at start-up, which commands that only build
    # configs (``tesla-func --help``) would pay; once loaded, the import is a dict lookup
    from kornia.geometry.transform import warp_affine

    h, w = x.shape[-2:]
    return warp_affine(x, matrix, (h, w), mode=mode, padding_mode="zeros", align_corners=True)


def _affine(
    x: Tensor,
    *,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    angle: Tensor | None = None,
) -> Tensor:
    """(B, 2, 3) pixel matrix about the image centre: shift (B, 2), scale (B, 2), angle (B,) deg."""
    from kornia.geometry.transform import get_affine_matrix2d  # where used: see _warp

    b, (h, w) = x.shape[0], x.shape[-2:]
    zeros2 = x.new_zeros(b, 2)
    # filled on x's device: a tensor from a Python list is a host-to-device copy, which on CUDA
    # waits for every queued kernel (one host sync per augmented step)
    centre = torch.stack([x.new_full((b,), (w - 1) / 2), x.new_full((b,), (h - 1) / 2)], dim=1)
    return get_affine_matrix2d(
        shift if shift is not None else zeros2,
        centre,
        scale if scale is not None else x.new_ones(b, 2),
        angle if angle is not None else x.new_zeros(b),
    )[:, :2]


def _crop(dsa: DSA, x: Tensor, v: Mapping[str, Tensor]) -> Tensor:
    h, w = x.shape[-2:]
    # max |shift| in px per axis, as Python numbers: no host-to-device copy (see _affine)
    shift = torch.stack([torch.floor(v["shift"][:, axis] * (2 * limit + 1)) - limit for axis, limit
                         in enumerate((int(w * dsa.crop + 0.5), int(h * dsa.crop + 0.5)))],
                        dim=1)  # (B, 2) integers in [-l, l]
    # Nearest sampling: an integer shift lands exactly on pixels, so values move unchanged.
    return _warp(x, _affine(x, shift=shift), mode="nearest")


def _cutout(dsa: DSA, x: Tensor, v: Mapping[str, Tensor]) -> Tensor:
    h, w = x.shape[-2:]
    side_h, side_w = int(h * dsa.cutout + 0.5), int(w * dsa.cutout + 0.5)
    # Centre in [0, side + 1 - size % 2), as the reference: an even square may hang off both edges.
    cx = torch.floor(v["centre"][:, 0] * (w + 1 - side_w % 2))  # (B,)
    cy = torch.floor(v["centre"][:, 1] * (h + 1 - side_h % 2))
    cols = torch.arange(w, device=x.device, dtype=x.dtype)  # (W,)
    rows = torch.arange(h, device=x.device, dtype=x.dtype)  # (H,)
    left, top = cx - side_w // 2, cy - side_h // 2
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side_w)  # (B, W)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side_h)  # (B, H)
    hole = in_rows[:, :, None] & in_cols[:, None, :]  # (B, H, W)
    return x * (~hole).to(x.dtype)[:, None]


def _flip(dsa: DSA, x: Tensor, v: Mapping[str, Tensor]) -> Tensor:
    from kornia.geometry.transform import hflip  # where used: see _warp

    return torch.where(_per_sample(v["flip"]), hflip(x), x)


def _scale(dsa: DSA, x: Tensor, v: Mapping[str, Tensor]) -> Tensor:
    return _warp(x, _affine(x, scale=v["scale"]))


def _rotate(dsa: DSA, x: Tensor, v: Mapping[str, Tensor]) -> Tensor:
    return _warp(x, _affine(x, angle=v["angle"]))


_APPLY: dict[str, Callable[[DSA, Tensor, Mapping[str, Tensor]], Tensor]] = {
    "color": _color,
    "crop": _crop,
    "cutout": _cutout,
    "flip": _flip,
    "scale": _scale,
    "rotate": _rotate,
}

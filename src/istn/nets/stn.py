"""Spatial transformer networks: a shared encoder and an affine or B-spline head.

An STN maps the stacked pair ``(S', T')`` [B, 2C, *shape] to the parameters of its
transformation model (``stn.transform``): affine sampling matrices or B-spline
control-point displacements. The model turns parameters into a sampling grid, so
prediction, test-time refinement and export share one code path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..errors import IstnError
from ..spatial import AffineModel, BSplineModel, affine_matrix
from .layers import avg_pool, conv


def encoder_size(n: int) -> int:
    """Feature size per axis after three [conv5 valid, avg-pool 2] blocks."""
    for _ in range(3):
        n = (n - 4) // 2
    return n


def min_stn_size() -> int:
    """Smallest spatial size per axis that leaves at least one encoder feature (36)."""
    n = 1
    while encoder_size(n) < 1:
        n += 1
    return n


class Encoder(nn.Module):
    """Three times [conv5x5 valid + ReLU + average-pool 2], channels in→8→16→32, flattened."""

    def __init__(self, dim: int, in_channels: int, shape: Sequence[int]):
        super().__init__()
        small = [n for n in shape if encoder_size(n) < 1]
        if small:
            raise IstnError(
                f"config 'size': {list(shape)[::-1]} is too small for the STN encoder; "
                f"every axis needs at least {min_stn_size()} voxels"
            )
        layers: list[nn.Module] = []
        for cin, cout in [(in_channels, 8), (8, 16), (16, 32)]:
            layers += [conv(dim, cin, cout, kernel_size=5), nn.ReLU(), avg_pool(dim, 2)]
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.features = 32 * math.prod(encoder_size(n) for n in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class STN(nn.Module):
    """Base: ``forward(x) -> params``; ``grid(params)`` samples the source in target space."""

    transform: nn.Module

    def grid(self, params: torch.Tensor) -> torch.Tensor:
        return self.transform.grid(params)


class AffineSTN(STN):
    """Affine STN: FC 32 + ReLU, four zero-initialised heads (identity at start).

    translation ``tanh(h) * max_translation``; rotation ``tanh(h) * max_rotation``
    (3D: Rz Rx Rz); scaling ``exp(tanh(h) * max_scaling)``; shearing
    ``tanh(h) * max_shearing`` used as a rotation Sh. Matrix Sh·Scale·Shᵀ·Rot·Trans.
    """

    def __init__(
        self,
        shape: Sequence[int],
        channels: int = 1,
        max_translation: float = 0.1,
        max_rotation: float = math.pi / 4,
        max_scaling: float = 0.2,
        max_shearing: float = math.pi / 4,
    ):
        super().__init__()
        dim = len(shape)
        self.dim = dim
        self.transform = AffineModel(shape)
        self.encoder = Encoder(dim, 2 * channels, shape)
        self.fc = nn.Sequential(nn.Linear(self.encoder.features, 32), nn.ReLU())
        n_angles = 1 if dim == 2 else 3
        self.translation = nn.Linear(32, dim)
        self.rotation = nn.Linear(32, n_angles)
        self.scaling = nn.Linear(32, dim)
        self.shearing = nn.Linear(32, n_angles)
        for head in (self.translation, self.rotation, self.scaling, self.shearing):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.bounds = (max_translation, max_rotation, max_scaling, max_shearing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.encoder(x))
        bt, br, bs, bsh = self.bounds
        a = affine_matrix(
            torch.tanh(self.translation(h)) * bt,
            torch.tanh(self.rotation(h)) * br,
            torch.exp(torch.tanh(self.scaling(h)) * bs),
            torch.tanh(self.shearing(h)) * bsh,
        )
        return a[:, : self.dim, :]


class BSplineSTN(STN):
    """B-spline STN: FC from the encoder straight to all control-point displacements.

    Displacements are ``tanh(h) * max_displacement`` (normalised units). As
    published the head keeps PyTorch's default (random) initialisation;
    ``zero_init=True`` starts at the identity instead.
    """

    def __init__(
        self,
        shape: Sequence[int],
        channels: int = 1,
        spacing: int | Sequence[int] = 10,
        max_displacement: float = 0.2,
        zero_init: bool = False,
    ):
        super().__init__()
        self.dim = len(shape)
        self.transform = BSplineModel(shape, spacing)
        self.encoder = Encoder(self.dim, 2 * channels, shape)
        self.params_shape = (self.dim, *self.transform.control_shape)
        self.head = nn.Linear(self.encoder.features, math.prod(self.params_shape))
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.max_displacement = max_displacement

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.head(self.encoder(x))) * self.max_displacement
        return h.view(-1, *self.params_shape)


def build_stn(kind: str, shape: Sequence[int], channels: int = 1, **options) -> STN:
    """Construct the STN named ``kind`` ('affine' | 'bspline') for array ``shape``."""
    if kind == "affine":
        return AffineSTN(shape, channels, **options)
    if kind == "bspline":
        return BSplineSTN(shape, channels, **options)
    raise IstnError(f"transformation '{kind}' is unknown; use 'affine' or 'bspline'")

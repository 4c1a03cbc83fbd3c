"""Spatial transformer networks: the published encoder and a transformation model's head.

An STN maps the stacked pair ``(S', T')`` [B, 2C, *shape] to the parameters of its
transformation model (``stn.transform``, from the registry in :mod:`istn.spatial`):
affine sampling matrices, B-spline control-point displacements, ... The model turns
parameters into a sampling grid, so prediction, test-time refinement and export
share one code path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..errors import IstnError
from ..spatial import Transformation, new_transformation, warp
from .keypoints import KeypointSTN
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
    """The published STN encoder followed by the head of a transformation model.

    ``forward(x) -> params`` for the stacked pair ``x = (S', T')`` [B, 2C, *shape];
    ``transform`` (a registered :class:`~istn.spatial.Transformation`) turns the
    parameters into a sampling grid, so prediction, refinement and export share it.
    """

    def __init__(self, transformation: str, shape: Sequence[int], channels: int = 1,
                 keypoints: int = 0, **options):
        super().__init__()
        self.dim = len(shape)
        self.transform: Transformation = new_transformation(transformation, shape, **options)
        self.keypoint_stn: KeypointSTN | None = None
        if keypoints:  # config 'stn_keypoints': an affine fitted to keypoints
            if transformation != "affine":
                raise IstnError(f"config 'stn_keypoints' {keypoints} needs the affine "
                                f"transformation (got '{transformation}'); set it to 0")
            if min(shape) < 4:
                raise IstnError(f"config 'size': {list(shape)[::-1]} is too small for a "
                                "keypoint STN; every axis needs at least 4 voxels")
            self.keypoint_stn = KeypointSTN(self.dim, channels, shape, keypoints)
        elif self.transform.stages:  # a cascade: one STN per stage
            self.stages = nn.ModuleList(
                STN(t.name, shape, channels, **{a: v for a, v in options.items()
                                                if a in type(t).options})
                for t in self.transform.stages)
        else:
            self.encoder = Encoder(self.dim, 2 * channels, shape)
            self.head = self.transform.head(self.encoder.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keypoint_stn is not None:
            return self.keypoint_stn(x)
        if not self.transform.stages:
            return self.head(self.encoder(x))
        parts: list[torch.Tensor] = []
        for stage in self.stages:
            parts.append(stage(self.stage_input(x, parts)))
        return self.transform.pack(parts)

    def stage_input(self, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        """A cascade's next stage input: the source of ``x`` warped by the stages whose
        parameters are ``parts`` (none: as is), stacked with the target."""
        if not parts:
            return x
        c = x.shape[1] // 2
        return torch.cat([warp(x[:, :c], self.transform.stage_grid(parts)), x[:, c:]], dim=1)

    def grid(self, params: torch.Tensor) -> torch.Tensor:
        return self.transform.grid(params)


def build_stn(kind: str, shape: Sequence[int], channels: int = 1, **options) -> STN:
    """The STN of the transformation model registered as ``kind``, for array ``shape``."""
    return STN(kind, shape, channels, **options)

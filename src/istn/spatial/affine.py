"""Affine transformation model: matrix from (translation, rotation, scaling, shearing).

The homogeneous matrix is ``A = Sh · Scale · Shᵀ · Rot · Trans`` (as published); its
top ``dim`` rows map output (target) normalised coordinates to input (source)
normalised coordinates, i.e. it is the sampling matrix of ``F.affine_grid``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Transformation, register_transformation
from .grid import ALIGN_CORNERS


def _rot2(a: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _axis_rotation(a: torch.Tensor, axis: int) -> torch.Tensor:
    """3x3 rotations by angles ``a`` [B] about axis 0 (x), 1 (y) or 2 (z).

    Built by stacking (no in-place writes) so that it works under ``torch.func.vmap``.
    """
    c, s = torch.cos(a), torch.sin(a)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    i, j = (axis + 1) % 3, (axis + 2) % 3  # cyclic, so that Ry has the standard sign
    entry = {(axis, axis): one, (i, i): c, (j, j): c, (i, j): -s, (j, i): s}
    rows = [torch.stack([entry.get((r, k), zero) for k in range(3)], -1) for r in range(3)]
    return torch.stack(rows, -2)


def rotation(angles: torch.Tensor, dim: int, axes: Sequence[int] = (2, 0, 2)) -> torch.Tensor:
    """Rotation matrices [B, dim, dim]. 2D: one angle. 3D: product of axis rotations.

    The published 3D rotation is Rz(a1) Rx(a2) Rz(a3) (``axes=(2, 0, 2)``); the
    shear rotation uses Rx Ry Rz (``axes=(0, 1, 2)``).
    """
    if dim == 2:
        return _rot2(angles[..., 0])
    r = _axis_rotation(angles[..., 0], axes[0])
    for k in range(1, 3):
        r = r @ _axis_rotation(angles[..., k], axes[k])
    return r


def _homogeneous(m: torch.Tensor, column: torch.Tensor | None = None) -> torch.Tensor:
    """[B, d, d] (and optional last column [B, d]) -> homogeneous [B, d+1, d+1]."""
    if column is None:
        column = m.new_zeros(m.shape[:-1])
    top = torch.cat([m, column.unsqueeze(-1)], dim=-1)
    bottom = F.pad(m.new_ones(m.shape[:-2] + (1, 1)), (m.shape[-1], 0))
    return torch.cat([top, bottom], dim=-2)


def affine_matrix(
    translation: torch.Tensor,
    rotation_angles: torch.Tensor,
    scaling: torch.Tensor,
    shearing: torch.Tensor,
) -> torch.Tensor:
    """Homogeneous matrices [B, dim+1, dim+1] = Sh · Scale · Shᵀ · Rot · Trans.

    ``translation`` [B, dim] (normalised units), ``rotation_angles`` [B, 1|3] (radians),
    ``scaling`` [B, dim] (diagonal factors), ``shearing`` [B, 1|3] (radians, used as
    a rotation ``Sh``).
    """
    dim = translation.shape[-1]
    rot = _homogeneous(rotation(rotation_angles, dim))
    sh = _homogeneous(rotation(shearing, dim, axes=(0, 1, 2)))
    scale = _homogeneous(torch.diag_embed(scaling))
    eye = torch.eye(dim, dtype=translation.dtype, device=translation.device)
    trans = _homogeneous(eye.expand(translation.shape[:-1] + (dim, dim)), translation)
    return sh @ scale @ sh.transpose(-1, -2) @ rot @ trans


@register_transformation("affine")
class AffineModel(Transformation):
    """Affine transformation: parameters are the sampling matrices theta [B, dim, dim+1].

    The STN head (as published): FC 32 + ReLU, then four zero-initialised linear heads
    (identity at start): translation ``tanh(h) * max_translation`` (normalised units),
    rotation ``tanh(h) * max_rotation`` (3D: Rz Rx Rz), scaling
    ``exp(tanh(h) * max_scaling)``, shearing ``tanh(h) * max_shearing`` used as a
    rotation Sh; matrix Sh·Scale·Shᵀ·Rot·Trans. ``max_translation_mm`` (with the grid's
    ``spacing``) bounds the translation in physical units instead: ``max_translation_mm``
    along every axis, i.e. ``max_translation_mm / ((n - 1) / 2 · spacing)`` normalised
    units along an axis of ``n`` voxels.
    """

    options: ClassVar[dict[str, str]] = {
        "max_translation": "max_translation", "max_rotation": "max_rotation",
        "max_scaling": "max_scaling", "max_shearing": "max_shearing",
        "max_translation_mm": "max_translation_mm", "spacing": "spacing"}

    def __init__(self, shape: Sequence[int], max_translation: float = 0.1,
                 max_rotation: float = math.pi / 4, max_scaling: float = 0.2,
                 max_shearing: float = math.pi / 4, max_translation_mm: float | None = None,
                 spacing: Sequence[float] | None = None):
        super().__init__(shape)
        translation: float | tuple[float, ...] = max_translation
        if max_translation_mm is not None:
            spacing = spacing if spacing is not None else [1.0] * self.dim
            sizes = self.shape[::-1]  # x, y[, z]
            translation = tuple(max_translation_mm / ((n - 1) / 2 * s)
                                for n, s in zip(sizes, spacing, strict=True))
        self.bounds = (translation, max_rotation, max_scaling, max_shearing)

    @property
    def params_shape(self) -> tuple[int, ...]:
        return (self.dim, self.dim + 1)

    def head(self, features: int) -> nn.Module:
        return AffineHead(features, self.dim, self.bounds)

    def grid(self, theta: torch.Tensor) -> torch.Tensor:
        """Sampling grid [B, *shape, dim] (target -> source, normalised coordinates)."""
        size = [theta.shape[0], 1, *self.shape]
        return F.affine_grid(theta, size, align_corners=ALIGN_CORNERS)

    def map_points(self, theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Apply the sampling map (target -> source) to normalised points [B, N, dim]."""
        return points @ theta[:, :, :-1].transpose(1, 2) + theta[:, None, :, -1]

    def map_points_jacobian(self, theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """d map_points / d theta [B, N, dim, dim * (dim + 1)] (theta flattened row by row):
        output coordinate ``a`` depends on row ``a`` only, with the weights ``(x, 1)``."""
        b, n, dim = points.shape
        xh = torch.cat([points, points.new_ones(b, n, 1)], -1)  # [B, N, dim+1]
        eye = torch.eye(dim, dtype=points.dtype, device=points.device)
        return (eye[None, None, :, :, None] * xh[:, :, None, None, :]).flatten(3)

    def inverse_map_points(self, theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Map normalised source points [B, N, dim] to the target (inverse sampling map)."""
        inv = torch.linalg.inv(self.homogeneous(theta))
        return self.map_points(inv[:, :-1], points)

    @staticmethod
    def homogeneous(theta: torch.Tensor) -> torch.Tensor:
        """[B, dim, dim+1] -> [B, dim+1, dim+1]."""
        return _homogeneous(theta[..., :-1], theta[..., -1])

    def linear_matrix(self, theta: torch.Tensor) -> torch.Tensor:
        return theta


class AffineHead(nn.Module):
    """Encoder features [B, F] -> sampling matrices [B, dim, dim+1] (see ``AffineModel``)."""

    def __init__(self, features: int, dim: int, bounds: tuple):
        super().__init__()
        self.dim = dim
        self.fc = nn.Sequential(nn.Linear(features, 32), nn.ReLU())
        n_angles = 1 if dim == 2 else 3
        self.translation = nn.Linear(32, dim)
        self.rotation = nn.Linear(32, n_angles)
        self.scaling = nn.Linear(32, dim)
        self.shearing = nn.Linear(32, n_angles)
        for head in (self.translation, self.rotation, self.scaling, self.shearing):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.bounds = bounds[1:]
        # the translation bound: one number, or one per axis (x, y[, z]; physical bounds)
        self.register_buffer("translation_bound", torch.as_tensor(bounds[0],
                                                                  dtype=torch.float32),
                             persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.fc(features)
        br, bs, bsh = self.bounds
        bt = self.translation_bound
        a = affine_matrix(
            torch.tanh(self.translation(h)) * bt,
            torch.tanh(self.rotation(h)) * br,
            torch.exp(torch.tanh(self.scaling(h)) * bs),
            torch.tanh(self.shearing(h)) * bsh,
        )
        return a[:, : self.dim, :]

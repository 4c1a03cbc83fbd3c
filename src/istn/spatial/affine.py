"""Affine transformation model: matrix from (translation, rotation, scaling, shearing).

The homogeneous matrix is ``A = Sh · Scale · Shᵀ · Rot · Trans`` (as published); its
top ``dim`` rows map output (target) normalised coordinates to input (source)
normalised coordinates, i.e. it is the sampling matrix of ``F.affine_grid``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

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


class AffineModel(torch.nn.Module):
    """Affine transformation: parameters are the sampling matrices theta [B, dim, dim+1]."""

    kind = "affine"

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(shape)
        self.dim = len(self.shape)

    def grid(self, theta: torch.Tensor) -> torch.Tensor:
        """Sampling grid [B, *shape, dim] (target -> source, normalised coordinates)."""
        size = [theta.shape[0], 1, *self.shape]
        return F.affine_grid(theta, size, align_corners=ALIGN_CORNERS)

    def map_points(self, theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Apply the sampling map (target -> source) to normalised points [B, N, dim]."""
        return points @ theta[:, :, :-1].transpose(1, 2) + theta[:, None, :, -1]

    def inverse_map_points(self, theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Map normalised source points [B, N, dim] to the target (inverse sampling map)."""
        inv = torch.linalg.inv(self.homogeneous(theta))
        return self.map_points(inv[:, :-1], points)

    @staticmethod
    def homogeneous(theta: torch.Tensor) -> torch.Tensor:
        """[B, dim, dim+1] -> [B, dim+1, dim+1]."""
        return _homogeneous(theta[..., :-1], theta[..., -1])

    def smoothness(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.new_zeros(())

"""Stationary velocity field (SVF): a diffeomorphism ``phi = exp(v)`` by scaling and squaring.

The velocity ``v`` is a cubic B-spline on a control grid (as :mod:`.bspline`: control
points every ``spacing`` voxels, normalised units, channels x, y[, z]); the dense
velocity is integrated with ``steps`` squarings: ``u_0 = v / 2^K``,
``u_{k+1} = u_k + u_k o (id + u_k)``, so ``phi = id + u_K``. The inverse is
``exp(-v)``, integrated the same way (exact up to the integration error, no
fixed-point search). Fields are composed by linear interpolation with border values
outside the grid; points are mapped by interpolating the dense field.

With ``stride`` s > 1 the velocity is integrated on a coarser grid spanning the same
domain, ``ceil((n - 1) / s) + 1`` points per axis (every s-th voxel where s divides
n - 1), and the displacement between its points is interpolated linearly. The velocity
is a cubic B-spline with control points ``spacing`` voxels apart, so a grid a few
voxels apart resolves it; each squaring then costs about ``s ** dim`` times less.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Transformation, register_transformation
from .bspline import BSplineHead, BSplineModel, _einsum_dense, bspline_basis
from .grid import ALIGN_CORNERS, identity_grid


def coarse_shape(shape: Sequence[int], stride: int) -> tuple[int, ...]:
    """Points per axis of the integration grid: ``ceil((n - 1) / stride) + 1``."""
    return tuple(-(-(n - 1) // stride) + 1 if n > 1 else 1 for n in shape)


def _sample(field: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """``field`` [B, dim, *shape] sampled at normalised ``at`` [B, *out, dim]: [B, dim, *out]."""
    return F.grid_sample(field, at, mode="bilinear", padding_mode="border",
                         align_corners=ALIGN_CORNERS)


def exp_velocity(v: torch.Tensor, identity: torch.Tensor, steps: int) -> torch.Tensor:
    """Displacement [B, dim, *shape] of ``exp(v)`` for a dense velocity ``v`` [B, dim, *shape]."""
    u = v / (2 ** steps)
    for _ in range(steps):
        u = u + _sample(u, identity + u.movedim(1, -1))
    return u


@register_transformation("svf")
class SVFModel(Transformation):
    """Diffeomorphic SVF on an image grid: parameters are control-point velocities.

    ``params`` [B, dim, *control_shape] (normalised units). The STN head is one fully
    connected layer, ``tanh(h) * max_displacement``, zero-initialised (identity at
    start). The regularisers act on the dense velocity.
    """

    options: ClassVar[dict[str, str]] = {
        "spacing": "bspline_spacing", "max_displacement": "max_displacement",
        "steps": "svf_steps", "stride": "svf_stride"}

    def __init__(self, shape: Sequence[int], spacing: int | Sequence[int] = 10,
                 max_displacement: float = 0.2, steps: int = 7, stride: int = 1):
        super().__init__(shape)
        self.velocity = BSplineModel(shape, spacing, max_displacement, zero_init=True)
        self.steps = steps
        self.stride = stride
        self.coarse = coarse_shape(self.shape, stride)
        if stride == 1:  # the image grid itself: the velocity model's own bases
            return
        v = self.velocity
        for a, (n, m) in enumerate(zip(self.shape, self.coarse, strict=True)):
            # the integration grid's points as voxel indices of the image grid
            pos = torch.arange(m, dtype=torch.float64) * ((n - 1) / max(m - 1, 1))
            basis = bspline_basis(pos, n, v.control_shape[a], v.spacing[a]).float()
            self.register_buffer(f"coarse_basis{a}", basis, persistent=False)
        self.register_buffer("coarse_identity", identity_grid(self.coarse), persistent=False)

    @property
    def control_shape(self) -> tuple[int, ...]:
        return self.velocity.control_shape

    @property
    def params_shape(self) -> tuple[int, ...]:
        return (self.dim, *self.control_shape)

    def head(self, features: int) -> nn.Module:
        return BSplineHead(features, (self.dim, *self.control_shape),
                           self.velocity.max_displacement, zero_init=True)

    def coarse_displacement(self, params: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Displacement [B, dim, *coarse] of ``exp(v)`` (``exp(-v)`` if ``inverse``) on the
        integration grid (the image grid when ``stride`` is 1)."""
        p = -params if inverse else params
        if self.stride == 1:
            v, identity = self.velocity.displacement(p), self.velocity.identity
        else:
            bases = [getattr(self, f"coarse_basis{a}").to(p.dtype) for a in range(self.dim)]
            v, identity = torch.einsum(_einsum_dense(self.dim), p, *bases), self.coarse_identity
        return exp_velocity(v, identity.to(params.dtype), self.steps)

    def displacement(self, params: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Dense displacement [B, dim, *shape] of ``exp(v)`` (``exp(-v)`` if ``inverse``)."""
        u = self.coarse_displacement(params, inverse)
        if self.stride == 1:
            return u
        mode = "bilinear" if self.dim == 2 else "trilinear"
        return F.interpolate(u, size=self.shape, mode=mode, align_corners=ALIGN_CORNERS)

    def grid(self, params: torch.Tensor) -> torch.Tensor:
        return self.velocity.identity.to(params.dtype) + self.displacement(params).movedim(1, -1)

    def _map(self, params: torch.Tensor, points: torch.Tensor, inverse: bool) -> torch.Tensor:
        u = self.coarse_displacement(params, inverse)
        at = points.reshape(len(points), -1, *([1] * (self.dim - 1)), self.dim)
        return points + _sample(u, at).reshape(len(points), self.dim, -1).transpose(1, 2)

    def map_points(self, params: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """The sampling map (target -> source) at normalised points [B, N, dim]."""
        return self._map(params, points, inverse=False)

    def inverse_map_points(self, params: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Source -> target: ``exp(-v)`` at normalised points [B, N, dim]."""
        return self._map(params, points, inverse=True)

    def deformation(self, params: torch.Tensor) -> torch.Tensor:
        """The dense velocity (regularising ``v`` keeps ``exp(v)`` smooth)."""
        return self.velocity.displacement(params)

    def regularisation(self, params: torch.Tensor, per_pair: bool = False) -> torch.Tensor:
        """Diffusion penalty of the dense velocity (from its control points, exact)."""
        return self.velocity.regularisation(params, per_pair)

    def bending(self, params: torch.Tensor, per_pair: bool = False) -> torch.Tensor:
        """Bending energy of the dense velocity (from its control points, exact)."""
        return self.velocity.bending(params, per_pair)

"""Stationary velocity field (SVF): a diffeomorphism ``phi = exp(v)`` by scaling and squaring.

The velocity ``v`` is a cubic B-spline on a control grid (as :mod:`.bspline`: control
points every ``spacing`` voxels, normalised units, channels x, y[, z]); the dense
velocity is integrated with ``steps`` squarings: ``u_0 = v / 2^K``,
``u_{k+1} = u_k + u_k o (id + u_k)``, so ``phi = id + u_K``. The inverse is
``exp(-v)``, integrated the same way (exact up to the integration error, no
fixed-point search). Fields are composed by linear interpolation with border values
outside the grid; points are mapped by interpolating the dense field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Transformation, register_transformation
from .bspline import BSplineHead, BSplineModel
from .grid import ALIGN_CORNERS


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
        "steps": "svf_steps"}

    def __init__(self, shape: Sequence[int], spacing: int | Sequence[int] = 10,
                 max_displacement: float = 0.2, steps: int = 7):
        super().__init__(shape)
        self.velocity = BSplineModel(shape, spacing, max_displacement, zero_init=True)
        self.steps = steps

    @property
    def control_shape(self) -> tuple[int, ...]:
        return self.velocity.control_shape

    @property
    def params_shape(self) -> tuple[int, ...]:
        return (self.dim, *self.control_shape)

    def head(self, features: int) -> nn.Module:
        return BSplineHead(features, (self.dim, *self.control_shape),
                           self.velocity.max_displacement, zero_init=True)

    def displacement(self, params: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Dense displacement [B, dim, *shape] of ``exp(v)`` (``exp(-v)`` if ``inverse``)."""
        v = self.velocity.displacement(-params if inverse else params)
        identity = self.velocity.identity.to(params.dtype)
        return exp_velocity(v, identity, self.steps)

    def grid(self, params: torch.Tensor) -> torch.Tensor:
        return self.velocity.identity.to(params.dtype) + self.displacement(params).movedim(1, -1)

    def _map(self, params: torch.Tensor, points: torch.Tensor, inverse: bool) -> torch.Tensor:
        u = self.displacement(params, inverse)
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

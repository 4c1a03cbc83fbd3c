"""Cubic B-spline free-form deformation (FFD), dimension-generic.

Control points are spaced ``spacing`` voxels apart along each axis; there are
``ceil(n / spacing) + 2`` of them per axis (one extra beyond each side) and the
image is centred in the control grid: control point ``k`` sits at voxel index
``x0 + k * spacing`` with ``x0 = (n - 1) / 2 - (ncp - 1) * spacing / 2``. The
dense displacement at voxel ``i`` is ``sum_k c_k * beta3((i - x_k) / spacing)``,
evaluated separably as one small basis matrix per axis (exact, no cropping).
Control-point values and displacements are in normalised units, channel order
(x, y[, z]).
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn as nn

from .base import Transformation, register_transformation
from .grid import identity_grid, normalised_to_index


def cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    """Uniform cubic B-spline kernel beta3(t), support (-2, 2)."""
    a = t.abs()
    inner = 2.0 / 3.0 - a**2 + a**3 / 2.0
    outer = (2.0 - a).clamp(min=0.0) ** 3 / 6.0
    return torch.where(a < 1.0, inner, outer)


def control_grid_shape(shape: Sequence[int], spacing: Sequence[int]) -> tuple[int, ...]:
    """Control points per axis, ``ceil(n / spacing) + 2`` (array order)."""
    return tuple(math.ceil(n / s) + 2 for n, s in zip(shape, spacing, strict=True))


def control_point_origin(n: int, ncp: int, spacing: float) -> float:
    """Voxel index of the first control point, centring the image in the grid."""
    return (n - 1) / 2.0 - (ncp - 1) * spacing / 2.0


def bspline_basis(
    positions: torch.Tensor, n: int, ncp: int, spacing: float
) -> torch.Tensor:
    """Weights [len(positions), ncp] of each control point at voxel ``positions`` of one axis."""
    x0 = control_point_origin(n, ncp, spacing)
    knots = x0 + spacing * torch.arange(ncp, dtype=positions.dtype, device=positions.device)
    return cubic_bspline((positions[:, None] - knots[None, :]) / spacing)


def _einsum_dense(dim: int) -> str:
    """'bcij,yi,xj->bcyx'-style equation for separable evaluation on a grid."""
    cp, out = string.ascii_lowercase[8 : 8 + dim], "zyx"[3 - dim :]
    return f"bc{cp}," + ",".join(f"{o}{c}" for o, c in zip(out, cp, strict=True)) + f"->bc{out}"


def _einsum_points(dim: int) -> str:
    """'bcij,bni,bnj->bnc'-style equation for evaluation at scattered points."""
    cp = string.ascii_lowercase[8 : 8 + dim]
    return f"bc{cp}," + ",".join(f"bn{c}" for c in cp) + "->bnc"


@register_transformation("bspline")
class BSplineModel(Transformation):
    """Cubic B-spline FFD on an image grid: parameters are control-point displacements.

    ``params`` has shape [B, dim, *control_shape] (channels x, y[, z]; normalised units).
    The STN head (as published) is one fully connected layer from the encoder features
    to all displacements, ``tanh(h) * max_displacement``, with PyTorch's default
    (random) initialisation; ``zero_init=True`` starts at the identity instead.
    """

    options: ClassVar[dict[str, str]] = {
        "spacing": "bspline_spacing", "max_displacement": "max_displacement",
        "zero_init": "bspline_zero_init"}

    def __init__(self, shape: Sequence[int], spacing: int | Sequence[int] = 10,
                 max_displacement: float = 0.2, zero_init: bool = False):
        super().__init__(shape)
        sp = [spacing] * self.dim if isinstance(spacing, int | float) else list(spacing)
        self.spacing = tuple(float(s) for s in sp)  # array order (z, y, x)
        self.control_shape = control_grid_shape(self.shape, self.spacing)
        self.max_displacement = max_displacement
        self.zero_init = zero_init
        axes = zip(self.shape, self.control_shape, self.spacing, strict=True)
        for a, (n, ncp, s) in enumerate(axes):
            pos = torch.arange(n, dtype=torch.float32)
            self.register_buffer(f"basis{a}", bspline_basis(pos, n, ncp, s), persistent=False)
        self.register_buffer("identity", identity_grid(self.shape), persistent=False)

    @property
    def params_shape(self) -> tuple[int, ...]:
        return (self.dim, *self.control_shape)

    def head(self, features: int) -> nn.Module:
        return BSplineHead(features, (self.dim, *self.control_shape), self.max_displacement,
                           self.zero_init)

    def bases(self) -> list[torch.Tensor]:
        return [getattr(self, f"basis{a}") for a in range(self.dim)]

    def displacement(self, params: torch.Tensor) -> torch.Tensor:
        """Dense displacement [B, dim, *shape] (normalised units, channels x, y[, z])."""
        bases = [b.to(params.dtype) for b in self.bases()]
        return torch.einsum(_einsum_dense(self.dim), params, *bases)

    def grid(self, params: torch.Tensor) -> torch.Tensor:
        """Sampling grid [B, *shape, dim]: identity plus the dense displacement."""
        return self.identity.to(params.dtype) + self.displacement(params).movedim(1, -1)

    def map_points(self, params: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Apply the sampling map (target -> source) to normalised points [B, N, dim]."""
        idx = normalised_to_index(points, self.shape)  # (x, y, z) order
        weights = []
        for a in range(self.dim):  # array axis a is point coordinate dim-1-a
            n, ncp, s = self.shape[a], self.control_shape[a], self.spacing[a]
            pos = idx[..., self.dim - 1 - a]
            weights.append(bspline_basis(pos.reshape(-1), n, ncp, s).reshape(*pos.shape, ncp))
        return points + torch.einsum(_einsum_points(self.dim), params, *weights)

    def inverse_map_points(
        self, params: torch.Tensor, points: torch.Tensor, iterations: int = 50
    ) -> torch.Tensor:
        """Map normalised source points to the target: solve ``y + u(y) = x`` by fixed point.

        Converges when the displacement is a contraction (|grad u| < 1), which holds
        for non-folding deformations of the size used here.
        """
        y = points.clone()
        for _ in range(iterations):
            y = points - (self.map_points(params, y) - y)
        return y

    def deformation(self, params: torch.Tensor) -> torch.Tensor:
        """The dense displacement (what the regularisers penalise)."""
        return self.displacement(params)

    def regularisation(self, params: torch.Tensor, per_pair: bool = False) -> torch.Tensor:
        """:func:`~.penalties.diffusion` of the dense displacement, from the control points.

        The field is linear in ``params``, so its mean squared differences are a quadratic
        form in them with one small Gram matrix per axis (:func:`_penalty`); the same
        value as on the dense field at a fraction of the cost (no dense field, forward or
        backward).
        """
        return self._penalty(params, [[a] for a in range(self.dim)], per_pair)

    def bending(self, params: torch.Tensor, per_pair: bool = False) -> torch.Tensor:
        """:func:`~.penalties.bending` of the dense displacement, from the control points."""
        terms = [[i, j] for i in range(self.dim) for j in range(i, self.dim)]
        return self._penalty(params, terms, per_pair)

    def _penalty(self, params: torch.Tensor, terms: list[list[int]], per_pair: bool
                 ) -> torch.Tensor:
        """Sum over ``terms`` (the axes differenced once each; mixed terms count twice) of
        the mean square of those differences of the dense field.

        Differencing axis a of ``u = (B_0 x B_1 x ...) c`` is ``D B_a`` there, so
        ``sum(diff(u) ** 2) = c . (K_0 x K_1 x ...) c`` with ``K_a = (D B_a)^T (D B_a)`` on
        differenced axes (``D``: forward differences, applied once per occurrence) and
        ``B_a^T B_a`` on the others.
        """
        bases = [b.to(params.dtype) for b in self.bases()]
        total = params.new_zeros(len(params))
        for axes in terms:
            grams, count = [], params.shape[1]
            for a, basis in enumerate(bases):
                for _ in range(axes.count(a)):
                    basis = basis.diff(dim=0)
                grams.append(basis.T @ basis)
                count *= basis.shape[0]
            weighted = params
            for a, gram in enumerate(grams):  # K_a along control axis a
                weighted = torch.movedim(torch.movedim(weighted, 2 + a, -1) @ gram, -1, 2 + a)
            value = (weighted * params).flatten(1).sum(1) / count
            total = total + (2.0 * value if len(set(axes)) == 2 else value)
        return total if per_pair else total.mean()


class BSplineHead(nn.Module):
    """Encoder features [B, F] -> control-point displacements [B, *params_shape]."""

    def __init__(self, features: int, params_shape: tuple[int, ...], max_displacement: float,
                 zero_init: bool = False):
        super().__init__()
        self.params_shape = params_shape
        self.linear = nn.Linear(features, math.prod(params_shape))
        if zero_init:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        self.max_displacement = max_displacement

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.linear(features)) * self.max_displacement
        return h.view(-1, *self.params_shape)

"""Regularisers of dense fields [B, C, *spatial] (finite differences in voxel steps).

Values are means over pairs, channels and voxels (``per_pair=True``: one value per
pair [B], the mean over its channels and voxels), in the field's own units per voxel
(normalised units for istn's displacements and velocities):

- diffusion: ``sum_i mean((d u / d x_i)^2)`` (forward differences);
- bending energy: ``sum_i mean((d2 u / d x_i^2)^2) + 2 sum_{i<j} mean((d2 u / d x_i d x_j)^2)``.
"""

from __future__ import annotations

import torch


def _mean(x: torch.Tensor, per_pair: bool) -> torch.Tensor:
    return x.flatten(1).mean(1) if per_pair else x.mean()


def diffusion(field: torch.Tensor, per_pair: bool = False) -> torch.Tensor:
    """Mean squared first differences, summed over the spatial axes."""
    dim = field.dim() - 2
    return torch.stack([_mean(field.diff(dim=2 + a).pow(2), per_pair)
                        for a in range(dim)]).sum(0)


def bending(field: torch.Tensor, per_pair: bool = False) -> torch.Tensor:
    """Mean squared second differences over all pairs of axes (mixed terms twice)."""
    dim = field.dim() - 2
    terms = []
    for i in range(dim):
        for j in range(i, dim):
            second = field.diff(dim=2 + i).diff(dim=2 + j)
            terms.append((1.0 if i == j else 2.0) * _mean(second.pow(2), per_pair))
    return torch.stack(terms).sum(0)

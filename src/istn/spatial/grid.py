"""Sampling grids and warping with one convention (``align_corners=True``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

ALIGN_CORNERS = True


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Identity sampling grid ``[1, *shape, dim]`` in normalised (x, y[, z]) coordinates.

    ``shape`` is the spatial shape in array order (z, y, x).
    """
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")  # array order (z, y, x)
    return torch.stack(mesh[::-1], dim=-1).unsqueeze(0)  # last dim (x, y, z)


def warp(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample ``image`` [B, C, *spatial] at ``grid`` [B, *out_spatial, dim].

    Linear interpolation (bilinear/trilinear), zero padding outside the image.
    """
    return F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=ALIGN_CORNERS)


def index_to_normalised(points: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel indices (x, y[, z]) -> normalised coordinates, for an image of array ``shape``."""
    n = torch.tensor(list(shape)[::-1], dtype=points.dtype, device=points.device)
    return 2.0 * points / (n - 1) - 1.0


def normalised_to_index(points: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Normalised coordinates -> voxel indices (x, y[, z]); inverse of ``index_to_normalised``."""
    n = torch.tensor(list(shape)[::-1], dtype=points.dtype, device=points.device)
    return (points + 1.0) * (n - 1) / 2.0

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


def sample_points(image: torch.Tensor, points: torch.Tensor, padding: str = "zeros"
                  ) -> torch.Tensor:
    """``image`` [B, C, *spatial] linearly interpolated at normalised ``points`` [B, N, dim]
    (x, y[, z]): [B, C, N].

    The same values and gradients as ``grid_sample`` (``align_corners=True``; ``padding``
    'zeros' or 'border'), computed as one gather per corner of the voxel cell around each
    point. For a fixed image (no gradient to it, as in refinement) at a few thousand
    scattered points this is about twice as fast as ``grid_sample`` forward and backward
    on the CPU (measured: 12 against 25 ms for 6 x 8192 points in 128 x 152 x 128
    voxels); with a gradient to the image its scatter backward is slower, so fields that
    are optimised keep ``grid_sample``.
    """
    b, c, *shape = image.shape
    dim = len(shape)
    size = torch.tensor(shape[::-1], dtype=points.dtype, device=points.device)  # x, y[, z]
    idx = (points + 1.0) * 0.5 * (size - 1)
    if padding == "border":
        idx = torch.minimum(idx.clamp_min(0.0), size - 1)
    elif padding != "zeros":
        raise ValueError(f"padding must be 'zeros' or 'border', got {padding!r}")
    low = idx.detach().floor()
    frac = idx - low
    low = low.long()
    strides = [1]
    for n in reversed(shape[1:]):  # x varies fastest in the flat index
        strides.append(strides[-1] * n)
    flat = image.reshape(b, c, -1)
    out = image.new_zeros(())
    for corner in range(2 ** dim):
        weight, index, inside = None, 0, None
        for a in range(dim):
            up = (corner >> a) & 1
            k = low[..., a] + up
            w = frac[..., a] if up else 1.0 - frac[..., a]
            ok = (k >= 0) & (k <= shape[dim - 1 - a] - 1)
            weight = w if weight is None else weight * w
            inside = ok if inside is None else inside & ok
            index = index + k.clamp(0, shape[dim - 1 - a] - 1) * strides[a]
        values = flat.gather(2, index.view(b, 1, -1).expand(b, c, -1))
        out = out + values * (weight * inside)[:, None, :]
    return out


def index_to_normalised(points: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel indices (x, y[, z]) -> normalised coordinates, for an image of array ``shape``."""
    n = torch.tensor(list(shape)[::-1], dtype=points.dtype, device=points.device)
    return 2.0 * points / (n - 1) - 1.0


def normalised_to_index(points: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Normalised coordinates -> voxel indices (x, y[, z]); inverse of ``index_to_normalised``."""
    n = torch.tensor(list(shape)[::-1], dtype=points.dtype, device=points.device)
    return (points + 1.0) * (n - 1) / 2.0

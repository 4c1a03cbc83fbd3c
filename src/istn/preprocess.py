"""Intensity normalisers and resampling onto the network grid.

The network grid has the configured ``size``/``spacing`` (x, y[, z]); by default
(``grid_orientation: world``) its axes are the physical x, y[, z] axes of ITK's
LPS world, so a network sees the same anatomy the same way whatever a file's
storage order, flips or obliquity. Its centre is the image's physical centre or
(``grid_centre: mass``) its intensity centre of mass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from .config import GRID_ORIENTATIONS
from .errors import IstnError


def normalise(arr: np.ndarray, kind: str, mask: np.ndarray | None = None,
              name: str = "image") -> np.ndarray:
    """Apply a normaliser. Statistics are taken inside ``mask`` (> 0) when given.

    none: unchanged; zero_mean_unit_var: (x - mean) / std; range_matching: the 4th
    and 96th percentiles map to 0 and 1; zero_one: min/max map to 0/1;
    threshold_zero: 1 where x > 0, else 0.
    """
    arr = arr.astype(np.float32)
    if kind == "none":
        return arr
    if kind == "threshold_zero":
        return (arr > 0).astype(np.float32)
    values = arr[mask > 0] if mask is not None else arr.ravel()
    if values.size == 0:
        raise IstnError(f"{name}: its mask is empty, so '{kind}' has no voxels to measure")
    if kind == "zero_mean_unit_var":
        lo, scale = float(values.mean()), float(values.std())
    elif kind == "range_matching":
        lo, hi = np.percentile(values, [4, 96])
        lo, scale = float(lo), float(hi - lo)
    elif kind == "zero_one":
        lo, scale = float(values.min()), float(values.max() - values.min())
    else:
        raise IstnError(f"unknown normaliser '{kind}'")
    if scale <= 0 or float(values.max()) == float(values.min()):
        raise IstnError(f"{name} is constant (inside its mask), so normaliser '{kind}' would "
                        "divide by zero; use normalizer 'none' or check the image")
    return (arr - lo) / scale


def image_centre(image: sitk.Image) -> np.ndarray:
    """Physical centre (x, y[, z]) of the voxel-centre grid of ``image``."""
    centre_idx = [(n - 1) / 2.0 for n in image.GetSize()]
    return np.array(image.TransformContinuousIndexToPhysicalPoint(centre_idx))


def centre_of_mass(image: sitk.Image, mask: np.ndarray | None = None) -> np.ndarray:
    """Physical intensity centre of mass (x, y[, z]) of ``image``, inside ``mask`` (> 0) if given.

    Negative intensities weigh 0 (so a CT's air does not pull the centre), which
    makes this the centre SimpleITK's ``CenteredTransformInitializer`` (MOMENTS)
    uses for any non-negative image. Falls back to :func:`image_centre` when no
    voxel has weight (a blank image or mask).
    """
    w = np.clip(sitk.GetArrayViewFromImage(image).astype(np.float64), 0.0, None)
    if mask is not None:
        w = np.where(np.asarray(mask) > 0, w, 0.0)
    total = w.sum()
    if not total > 0:
        return image_centre(image)
    # Marginal sums per array axis (z, y, x): no index arrays of the volume's size.
    axes = range(w.ndim)
    mean_idx = [float(np.dot(w.sum(axis=tuple(a for a in axes if a != k)),
                             np.arange(w.shape[k])) / total) for k in axes]
    # The index -> physical map is affine, so the centre of mass maps exactly.
    return np.array(image.TransformContinuousIndexToPhysicalPoint(mean_idx[::-1]))


def network_grid(image: sitk.Image, spacing: Sequence[float], size: Sequence[int],
                 orientation: str = "world", centre: Sequence[float] | None = None
                 ) -> tuple[list[float], list[float]]:
    """(origin, direction) of the network grid of ``size``/``spacing`` (x, y[, z]) for ``image``.

    orientation 'world': identity direction (axes along the physical x, y[, z] of
    ITK's LPS world), whatever the file's storage order, flips or obliquity;
    'image': the image's own direction (istn before grid_orientation). The grid is
    centred on ``centre`` (physical), by default the image's centre.
    """
    if orientation not in GRID_ORIENTATIONS:
        raise IstnError(f"unknown grid orientation '{orientation}'; use one of "
                        f"{', '.join(GRID_ORIENTATIONS)}")
    d = image.GetDimension()
    c = image_centre(image) if centre is None else np.asarray(centre, dtype=float)
    direction = (np.eye(d) if orientation == "world"
                 else np.array(image.GetDirection()).reshape(d, d))
    half = (np.asarray(size, dtype=float) - 1) / 2.0 * np.asarray(spacing, dtype=float)
    return (c - direction @ half).tolist(), direction.ravel().tolist()


def resample(image: sitk.Image, spacing: Sequence[float], size: Sequence[int],
             interpolator: int = sitk.sitkLinear, pad: float = 0.0,
             orientation: str = "world", centre: Sequence[float] | None = None) -> sitk.Image:
    """Resample onto the network grid of :func:`network_grid` (float32).

    The image's own origin, spacing and direction are honoured, so two files with
    the same physical content in different storage orders give the same result
    with orientation 'world'. Field of view is cropped or padded symmetrically
    about the centre. A no-op when the grid already matches the image's.
    """
    origin, direction = network_grid(image, spacing, size, orientation, centre)
    return resample_onto(image, origin, spacing, direction, size, interpolator, pad)


def resample_onto(image: sitk.Image, origin: Sequence[float], spacing: Sequence[float],
                  direction: Sequence[float], size: Sequence[int],
                  interpolator: int = sitk.sitkLinear, pad: float = 0.0) -> sitk.Image:
    """Resample onto the given grid (float32); the image itself when its grid is that grid.

    Returning the image unchanged keeps identical grids bit-exact (an interpolator
    evaluated at voxel centres can differ from the voxel values by rounding).
    A grid within a thousandth of a voxel of the image's counts as the same: the
    image then keeps its own (honest) geometry, which is what exports compose.
    """
    size = [int(s) for s in size]
    spacing = [float(s) for s in spacing]
    if (list(image.GetSize()) == size and np.allclose(image.GetSpacing(), spacing)
            and np.allclose(image.GetDirection(), direction, rtol=0, atol=1e-6)
            and np.allclose(image.GetOrigin(), origin, rtol=0, atol=1e-3 * min(spacing))):
        return image
    return sitk.Resample(image, size, sitk.Transform(), interpolator, [float(o) for o in origin],
                         spacing, [float(v) for v in direction], pad, sitk.sitkFloat32)

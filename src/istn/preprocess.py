"""Intensity normalisers and resampling to the configured spacing and size."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

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


def resample(image: sitk.Image, spacing: Sequence[float], size: Sequence[int],
             interpolator: int = sitk.sitkLinear, pad: float = 0.0) -> sitk.Image:
    """Resample onto a grid of ``size``/``spacing`` (x, y[, z]) with the same centre and direction.

    The output grid is centred on the physical centre of the input, so field of
    view is cropped or padded symmetrically. A no-op when the grid already matches.
    """
    size = [int(s) for s in size]
    spacing = [float(s) for s in spacing]
    if list(image.GetSize()) == size and np.allclose(image.GetSpacing(), spacing):
        return image
    centre_idx = [(n - 1) / 2.0 for n in image.GetSize()]
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(centre_idx))
    direction = np.array(image.GetDirection()).reshape(image.GetDimension(), -1)
    half = (np.array(size) - 1) / 2.0 * np.array(spacing)
    origin = centre - direction @ half
    return sitk.Resample(image, size, sitk.Transform(), interpolator, origin.tolist(),
                         spacing, image.GetDirection(), pad, sitk.sitkFloat32)

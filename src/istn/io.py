"""Reading and writing images with SimpleITK (geometry kept), atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import IstnError


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read any SimpleITK-supported image as float32 scalar image, geometry kept.

    Multi-component (e.g. RGB PNG) images are averaged to one channel.
    """
    p = Path(path)
    if p.is_dir():
        raise IstnError(f"{what} '{p}' is a directory, not an image file")
    if not p.exists():
        raise IstnError(f"{what} '{p}' does not exist; check the path (relative paths are "
                        "resolved against the working directory, then the CSV's folder)")
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError:
        raise IstnError(f"{what} '{p}' cannot be read as an image (corrupt or unsupported "
                        "format); use PNG, NIfTI, MHA, NRRD or another SimpleITK format") from None
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = sitk.GetArrayFromImage(img).astype(np.float32).mean(axis=-1)
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        img = out
    return sitk.Cast(img, sitk.sitkFloat32)


def atomic_path(path: str | Path) -> Path:
    """A temporary path in the same folder, with the same suffixes (for atomic writes)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(p.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name.split('.')[0]}-", suffix=suffix, dir=p.parent)
    os.close(fd)
    return Path(tmp)


def write_image(image: sitk.Image, path: str | Path) -> None:
    """Write an image atomically (temporary file in the same folder, then rename)."""
    tmp = atomic_path(path)
    try:
        sitk.WriteImage(image, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically."""
    tmp = atomic_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def array_to_image(arr: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Wrap an array (SimpleITK order) as an image with ``reference``'s geometry."""
    img = sitk.GetImageFromArray(np.asarray(arr, dtype=np.float32))
    img.CopyInformation(reference)
    return img

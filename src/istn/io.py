"""Reading and writing images with SimpleITK (geometry kept), atomically."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import layout
from .errors import IstnError


def read_image(path: str | Path, what: str = "image", components: bool = False) -> sitk.Image:
    """Read any SimpleITK-supported image as float32 scalar image, geometry kept.

    An alpha channel is dropped; colour (RGB) images are averaged to one channel, with a
    warning; images 1 voxel thick along an axis are refused. ``components=True`` keeps
    every component (a vector float32 image; probability maps of several structures).
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
    if img.GetDimension() not in (2, 3):
        raise IstnError(f"{what} '{p}' is {img.GetDimension()}D; istn registers 2D and 3D "
                        "images (split time series or channels into separate files)")
    if p.name.endswith((".nii", ".nii.gz")) and not _nifti_finite(p):
        raise IstnError(f"image '{p}' contains NaN or Inf values; clean or mask them first")
    if components:
        if min(img.GetSize()) < 2:
            _scalar(img, f"{what} '{p}'")  # raises: 1 voxel thick
        return sitk.Cast(img, sitk.sitkVectorFloat32)
    return _scalar_float(img, f"{what} '{p}'")


def _scalar_float(img: sitk.Image, what: str) -> sitk.Image:
    """float32, one channel (see :func:`_scalar`); ``what`` names the image."""
    return sitk.Cast(_scalar(img, what), sitk.sitkFloat32)


def as_image(source: str | Path | sitk.Image | np.ndarray, what: str = "image") -> sitk.Image:
    """A float32 scalar image from a file, an ``sitk.Image`` or a numpy array.

    Files are read with :func:`read_image`. An ``sitk.Image`` keeps its geometry
    (multi-component images become one channel, as files do). A numpy array
    is in SimpleITK order (z, y, x) and gets unit spacing, zero origin and the identity
    direction: give an ``sitk.Image`` for anything else.
    """
    if isinstance(source, str | Path):
        return read_image(source, what)
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3):
            raise IstnError(f"{what}: a numpy array must be 2D or 3D, got shape {source.shape}")
        source = sitk.GetImageFromArray(np.asarray(source, dtype=np.float32))
    if not isinstance(source, sitk.Image):
        raise IstnError(f"{what}: expected a file path, a SimpleITK image or a numpy array, "
                        f"got {type(source).__name__}")
    if source.GetDimension() not in (2, 3):
        raise IstnError(f"{what} is {source.GetDimension()}D; istn registers 2D and 3D images")
    img = _scalar_float(source, what)
    if not np.isfinite(sitk.GetArrayViewFromImage(img)).all():
        raise IstnError(f"{what} contains NaN or Inf values; clean or mask them first")
    return img


# integer vector pixels: PNG, TIFF, JPEG colours, whose last channel of 2 or 4 is alpha
_COLOUR_TYPES = (sitk.sitkVectorUInt8, sitk.sitkVectorUInt16)


def _scalar(img: sitk.Image, what: str) -> sitk.Image:
    """One channel: alpha dropped (it is no intensity); colours averaged, with a warning.

    ``what`` names the image (with its file). Also refuses images without extent
    along an axis (a single slice, a line): they cannot be resampled onto a grid.
    """
    if min(img.GetSize()) < 2:
        raise IstnError(f"{what} has size {list(img.GetSize())}: it is 1 voxel thick along an "
                        "axis (a single slice or line); give at least 2 voxels per axis "
                        "(store a single slice as a 2D image)")
    n = img.GetNumberOfComponentsPerPixel()
    if n == 1:
        return img
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    if n in (2, 4) and img.GetPixelID() in _COLOUR_TYPES:
        arr = arr[..., :-1]
    if arr.shape[-1] > 1 and not (arr == arr[..., :1]).all():
        print(f"istn: warning: {what} has {arr.shape[-1]} colour channels; using their mean "
              "as grey value (convert it to a grey-value image to choose)", file=sys.stderr)
    out = sitk.GetImageFromArray(arr.mean(axis=-1))
    out.CopyInformation(img)
    return out


def _nifti_finite(path: Path) -> bool:
    """True unless a NIfTI-1 float file holds NaN/Inf (SimpleITK silently zeroes them)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            hdr = f.read(348)
            if len(hdr) < 348:
                return True
            end = "<" if struct.unpack("<i", hdr[:4])[0] == 348 else ">"
            if struct.unpack(end + "i", hdr[:4])[0] != 348:
                return True  # NIfTI-2 or not NIfTI: leave it to SimpleITK
            dtype = {16: "f4", 64: "f8"}.get(struct.unpack(end + "h", hdr[70:72])[0])
            if dtype is None:
                return True
            f.seek(int(struct.unpack(end + "f", hdr[108:112])[0]))
            return bool(np.isfinite(np.frombuffer(f.read(), end + dtype)).all())
    except (OSError, EOFError, struct.error):
        return True


def atomic_path(path: str | Path) -> Path:
    """A temporary path in the same folder, with the same suffixes (for atomic writes)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(p.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name.split('.')[0]}-", suffix=suffix, dir=p.parent)
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes 0600 files; give the final file the usual mode
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A crash leaves either the old file or the new one, never a half-written one.
    Failures name ``path``, never the temporary file: an ``OSError`` (full disk, no
    permission) stays an ``OSError`` with ``path`` as its file name; a writer's
    ``RuntimeError`` (SimpleITK: unknown format or pixel type; torch.save: a failed
    write) becomes an :class:`IstnError`.
    """
    try:
        tmp = atomic_path(path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except RuntimeError as e:
        lines = [x.strip() for x in str(e).replace(str(tmp), str(path)).splitlines()]
        why = (lines[-1] if lines and lines[-1] else type(e).__name__).removeprefix(
            "sitk::ERROR: ")
        raise IstnError(f"cannot write '{path}': {why[:200]}; check the file extension (the "
                        "format), the path, permissions and free disk space") from None
    finally:
        tmp.unlink(missing_ok=True)


def replace_folder(folder: str | Path, write: Callable[[Path], object],
                   results: Collection[str] = ()) -> None:
    """Write a set of result files as a whole: ``write(tmp)`` fills a sibling folder,
    which then replaces ``folder``.

    A failure (a full disk) leaves the old folder as it was or the new one complete,
    never old files next to new ones. Entries of the old folder not named in
    ``results`` (the user's own files) are moved into the new one.
    """
    folder = Path(folder).absolute()
    if Path.cwd().resolve().is_relative_to(folder.resolve()):
        raise IstnError(f"output folder '{folder}' holds the working folder; its results are "
                        "replaced as a whole: give a folder of its own")
    new, old = layout.staging_dir(folder), layout.replaced_dir(folder)
    for leftover in (new, old):  # from a run that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    new.mkdir(parents=True)
    try:
        write(new)
        if folder.exists():
            os.rename(folder, old)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    try:
        os.rename(new, folder)
    except BaseException:
        if old.exists():
            os.rename(old, folder)
        shutil.rmtree(new, ignore_errors=True)
        raise
    if old.exists():
        for entry in old.iterdir():
            if entry.name not in results:
                os.replace(entry, folder / entry.name)
        shutil.rmtree(old)


# formats that hold unsigned integers only: the pixel types they take, smallest first
_INTEGER_FORMATS = {".png": ((sitk.sitkUInt8, np.uint8), (sitk.sitkUInt16, np.uint16)),
                    **{s: ((sitk.sitkUInt8, np.uint8),) for s in (".jpg", ".jpeg", ".bmp")}}


def _for_format(image: sitk.Image, path: Path) -> sitk.Image:
    """``image`` cast to an integer type the format of ``path`` holds (PNG: 8 or 16 bit).

    Values that do not fit are rounded and clipped, with a warning naming the file.
    """
    types = _INTEGER_FORMATS.get(path.suffix.lower())
    if types is None or image.GetNumberOfComponentsPerPixel() != 1:
        return image
    arr = sitk.GetArrayFromImage(image)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    pixel, dtype = next(((p, d) for p, d in types if hi <= np.iinfo(d).max), types[-1])
    top = np.iinfo(dtype).max
    fitted = np.clip(np.rint(arr), 0, top)
    if lo < 0 or hi > top:
        print(f"istn: warning: '{path}': values {lo:g} to {hi:g} clipped to 0 to {top} (a "
              f"{path.suffix} file holds integers 0 to {top}); write .nii.gz or .mha to keep "
              "them", file=sys.stderr)
    elif not np.array_equal(fitted, arr):
        print(f"istn: warning: '{path}': values rounded to integers (a {path.suffix} file "
              "holds integers); write .nii.gz or .mha to keep them", file=sys.stderr)
    if image.GetPixelID() == pixel:
        return image
    out = sitk.GetImageFromArray(fitted.astype(dtype))
    out.CopyInformation(image)
    return out


def write_image(image: sitk.Image, path: str | Path) -> None:
    """Write an image atomically, in an integer type where the format needs one (PNG)."""
    p = Path(path)
    if not p.suffix:
        raise IstnError(f"output image '{p}' has no file extension; add one that names the "
                        "format: .nii.gz, .mha, .nrrd, .png, ...")
    image = _for_format(image, p)
    write_atomically(p, lambda tmp: sitk.WriteImage(image, str(tmp)))


def write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically."""
    write_atomically(path, lambda tmp: tmp.write_text(text))


def array_to_image(arr: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Wrap an array (SimpleITK order) as an image with ``reference``'s geometry."""
    img = sitk.GetImageFromArray(np.asarray(arr, dtype=np.float32))
    img.CopyInformation(reference)
    return img


def write_transform(transform: sitk.Transform, path: str | Path) -> None:
    """Write an ITK transform file (.tfm, .h5) atomically."""
    write_atomically(path, lambda tmp: sitk.WriteTransform(transform, str(tmp)))

"""On-disk cache of preprocessed images (the result of :func:`istn.data.load_volume`).

Entries live in ``$ISTN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/istn``, else
``~/.cache/istn``; one ``<sha256>.npz`` file per (image, mask, preprocessing)
combination. The key covers the resolved paths of the image and mask, their
modification times (ns) and sizes, the kind and normaliser, the network grid
(``size``/``spacing`` and its placement: ``grid_orientation``/``grid_centre``, or the
exact grid of the image a segmentation is resampled onto), SimpleITK's version and
:data:`FORMAT_VERSION`, so an edited file or a changed config is a miss and stale
entries are simply never read again.
``ISTN_NO_CACHE=1`` turns the cache off. Entries are written atomically and with
``np.savez`` (no pickle); an unreadable entry counts as a miss, and a cache folder
that cannot be written is skipped with one warning rather than failing the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .io import write_atomically

# Bump when preprocessing (normalise/resample/read_image) or the entry layout changes:
# old entries then stop matching any key.
# 2: world-aligned network grids (grid_orientation, grid_centre) and segmentations on
# their image's grid. 3: read_image drops the alpha channel of RGBA/LA images.
FORMAT_VERSION = 3
# A file modified less than this long ago is not cached: a second write within the
# file system's timestamp granularity (coarse clock ticks; 2 s on FAT) could keep
# the same mtime and size, and the stale entry would then be served ("racy" files).
SETTLE_S = 2.0

_ENTRY = re.compile(r"[0-9a-f]{64}\.npz")
_TEMP = re.compile(r"\.[0-9a-f]{64}-.*\.npz")  # left by a run killed mid-write
_GEOMETRY = ("origin", "spacing", "direction", "size")
_warned = False


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    if os.environ.get("ISTN_CACHE_DIR"):
        return Path(os.environ["ISTN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "istn"


def enabled() -> bool:
    """False when ``ISTN_NO_CACHE`` is set to anything but '' or '0'."""
    return os.environ.get("ISTN_NO_CACHE", "") in ("", "0")


def volume_key(path: str | Path, mask_path: str | Path | None, kind: str, normaliser: str,
               size: Sequence[int], spacing: Sequence[float],
               grid: Mapping[str, Any] | None = None) -> str | None:
    """sha256 hex key of one preprocessed image, or None if a file cannot be stat'ed.

    ``normaliser`` is the one configured for ``kind`` (``'none'`` for 'raw'); ``grid``
    (JSON-serialisable) says how the network grid is placed.
    """
    files = []
    for p in (path, mask_path):
        if p is None:
            files.append(None)
            continue
        try:
            q = Path(p).resolve()
            st = q.stat()
        except (OSError, ValueError, RuntimeError):  # missing, bad name, symlink loop
            return None
        files.append([str(q), st.st_mtime_ns, st.st_size])
    desc = {"version": FORMAT_VERSION, "sitk": sitk.Version_VersionString(),
            "image": files[0], "mask": files[1], "kind": kind, "normaliser": normaliser,
            "size": [int(s) for s in size], "spacing": [float(s) for s in spacing],
            "grid": dict(grid) if grid is not None else None}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def settled(*paths: str | Path | None) -> bool:
    """True if every given file was last modified at least :data:`SETTLE_S` ago."""
    now = time.time()
    try:
        return all(now - Path(p).stat().st_mtime >= SETTLE_S  # also False if in the future
                   for p in paths if p is not None)
    except OSError:
        return False


def entry_path(key: str) -> Path:
    return cache_dir() / f"{key}.npz"


def _geometry(img: sitk.Image, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}_origin": np.array(img.GetOrigin(), float),
            f"{prefix}_spacing": np.array(img.GetSpacing(), float),
            f"{prefix}_direction": np.array(img.GetDirection(), float),
            f"{prefix}_size": np.array(img.GetSize(), np.int64)}


def _set_geometry(img: sitk.Image, z: dict[str, np.ndarray], prefix: str) -> sitk.Image:
    img.SetOrigin(z[f"{prefix}_origin"].tolist())
    img.SetSpacing(z[f"{prefix}_spacing"].tolist())
    img.SetDirection(z[f"{prefix}_direction"].tolist())
    return img


def write_volume(key: str, array: np.ndarray, resampled: sitk.Image,
                 file_image: sitk.Image) -> bool:
    """Store a preprocessed array with both geometries; False (and one warning) on failure."""
    global _warned
    data = {"key": np.array(key), "array": np.ascontiguousarray(array, np.float32),
            **_geometry(resampled, "res"), **_geometry(file_image, "file")}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would otherwise rename it
            np.savez(f, **data)

    try:
        write_atomically(entry_path(key), write)
    except OSError as e:  # read-only home, full disk, ...: caching is optional
        if not _warned:
            _warned = True
            warnings.warn(f"istn: cannot write the preprocessing cache in '{cache_dir()}' "
                          f"({e}); continuing without it (set ISTN_CACHE_DIR or "
                          "ISTN_NO_CACHE=1)", RuntimeWarning, stacklevel=2)
        return False
    return True


def read_volume(key: str) -> tuple[np.ndarray, sitk.Image, sitk.Image] | None:
    """(array, resampled image, file image) of an entry, or None if absent or unusable.

    The file image carries the file's geometry only; its pixels are zero.
    """
    path = entry_path(key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            z = {k: npz[k] for k in npz.files}
        arr = z["array"]
        d = arr.ndim
        for prefix in ("res", "file"):
            shapes = [z[f"{prefix}_{g}"].shape for g in _GEOMETRY]
            if shapes != [(d,), (d,), (d * d,), (d,)]:
                raise ValueError(f"{prefix} geometry does not fit a {d}D image")
        if (str(z["key"]) != key or arr.dtype != np.float32
                or arr.shape != tuple(z["res_size"][::-1].tolist())):
            raise ValueError("entry does not match its key")
        res = _set_geometry(sitk.GetImageFromArray(arr), z, "res")
        # Callers need only the file's geometry; a blank image avoids reading the file.
        blank = sitk.Image([int(n) for n in z["file_size"]], sitk.sitkFloat32)
        return arr, res, _set_geometry(blank, z, "file")
    except Exception:  # any unreadable entry (truncated, garbage, foreign) is just a miss
        return None


def _owned(folder: Path) -> list[Path]:
    """Entry files (and leftover temporary files) in the cache folder; nothing else."""
    try:
        return [p for p in folder.iterdir()
                if (_ENTRY.fullmatch(p.name) or _TEMP.fullmatch(p.name)) and p.is_file()]
    except OSError:
        return []


def cache_info() -> tuple[Path, int, int]:
    """(cache folder, number of entries, total bytes of the cache's files)."""
    folder = cache_dir()
    files = _owned(folder)
    size = 0
    for p in files:
        try:
            size += p.stat().st_size
        except OSError:
            pass
    return folder, sum(1 for p in files if _ENTRY.fullmatch(p.name)), size


def clear_cache() -> int:
    """Delete the cache's files (only names istn writes); returns how many were removed."""
    removed = 0
    for p in _owned(cache_dir()):
        try:
            p.unlink()
            removed += 1
        except OSError:
            pass
    return removed

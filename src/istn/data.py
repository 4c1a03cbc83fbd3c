"""Pair lists (CSV) and loading of pairs into tensors on the network grid.

A pair CSV has the header ``src,trg`` and one pair per row. Parallel CSVs list
segmentations (SoI), masks, landmark images and ground-truth transforms in the
same row order. Relative paths resolve against the working directory first,
then the CSV's own folder.
"""

from __future__ import annotations

import csv
import io as _io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import cache
from .config import Config
from .errors import IstnError, count
from .io import read_image
from .preprocess import centre_of_mass, normalise, resample, resample_onto


def read_pair_csv(path: str | Path, what: str = "pairs") -> list[tuple[Path, Path]]:
    """Read a ``src,trg`` CSV and resolve its paths (working directory, then CSV folder)."""
    p = Path(path)
    if not p.is_file():
        raise IstnError(f"{what} CSV '{p}' does not exist or is not a file")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:  # tolerate Excel's BOM
            reader = csv.reader(f)
            numbered = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise IstnError(f"{what} CSV '{p}' cannot be parsed: {e}") from None
    rows = [r for _, r in numbered]
    if not rows:
        raise IstnError(f"{what} CSV '{p}' is empty; it needs a header 'src,trg' "
                        "and one row per pair")
    header = [c.strip() for c in rows[0]]
    if header[:2] != ["src", "trg"]:
        raise IstnError(f"{what} CSV '{p}' must start with the header row 'src,trg', "
                        f"found '{','.join(rows[0])}'")
    if len(rows) == 1:
        raise IstnError(f"{what} CSV '{p}' has a header but no pairs")
    out = []
    for i, row in numbered[1:]:
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise IstnError(f"{what} CSV '{p}' line {i}: expected two columns 'src,trg', "
                            f"got {row}")
        out.append((_resolve(row[0].strip(), p), _resolve(row[1].strip(), p)))
    return out


def _resolve(entry: str, csv_path: Path) -> Path:
    q = Path(entry)
    try:
        if q.is_absolute() or q.exists():
            return q
    except (OSError, ValueError):  # e.g. a name too long for the file system
        raise IstnError(f"CSV '{csv_path}': '{entry[:80]}' is not a usable path") from None
    return csv_path.parent / q


def read_points(path: Path, dim: int) -> np.ndarray:
    """Physical points from a CSV with header ``x,y[,z]`` (one point per row)."""
    if not Path(path).is_file():
        raise IstnError(f"points CSV '{path}' does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    want = ["x", "y", "z"][:dim]
    header = [c.strip() for c in rows[0]] if rows else []
    if header[:dim] != want:
        raise IstnError(f"points CSV '{path}' must start with the header '{','.join(want)}'")
    if len(header) > dim:  # e.g. x,y,z for a 2D transform: dropping z would be silent
        raise IstnError(f"points CSV '{path}' has the columns '{','.join(header)}' but the "
                        f"images and transform are {dim}D; give exactly '{','.join(want)}'")
    try:
        pts = np.array([[float(v) for v in r[:dim]] for r in rows[1:]], dtype=float)
    except ValueError:
        raise IstnError(f"points CSV '{path}' has a non-numeric coordinate") from None
    if pts.size and (pts.shape[1] != dim or not np.isfinite(pts).all()):
        raise IstnError(f"points CSV '{path}' needs {dim} finite coordinates per row")
    return pts.reshape(-1, dim)


def write_points(points: np.ndarray, path: Path) -> None:
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["x", "y", "z"][: points.shape[1]])
    w.writerows([[f"{v:.6f}" for v in p] for p in points])
    from .io import write_text

    write_text(buf.getvalue(), path)


@dataclass
class Geometry:
    """Index <-> physical mapping of an image grid (indices and points in (x, y[, z]))."""

    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    size: tuple[int, ...]

    @classmethod
    def of(cls, img: sitk.Image) -> Geometry:
        d = img.GetDimension()
        return cls(np.array(img.GetOrigin()), np.array(img.GetSpacing()),
                   np.array(img.GetDirection()).reshape(d, d), tuple(img.GetSize()))

    def to_physical(self, idx: np.ndarray) -> np.ndarray:
        return self.origin + (idx * self.spacing) @ self.direction.T

    def to_index(self, pts: np.ndarray) -> np.ndarray:
        return np.linalg.solve(self.direction, (pts - self.origin).T).T / self.spacing


@dataclass
class PairSet:
    """Pairs preprocessed onto the network grid. Images are [N, 1, *shape] float32;
    segmentations [N, C, *shape], one channel per SoI structure (config 'labels',
    'soi_components'; else C = 1)."""

    names: list[str]
    src: torch.Tensor
    trg: torch.Tensor
    src_seg: torch.Tensor | None = None
    trg_seg: torch.Tensor | None = None
    src_pts: torch.Tensor | None = None
    trg_pts: torch.Tensor | None = None
    # Ground-truth transforms (4x4, image index -> template index) per pair, or None.
    transforms: list[tuple[np.ndarray, np.ndarray]] | None = None
    # Geometry of each source/target file and of its network grid.
    src_file: list[Geometry] = field(default_factory=list)
    trg_file: list[Geometry] = field(default_factory=list)
    src_grid: list[Geometry] = field(default_factory=list)
    trg_grid: list[Geometry] = field(default_factory=list)
    references: list[sitk.Image] = field(default_factory=list)  # target on the network grid
    # Landmarks given as point CSVs (network-grid indices, rows correspond), or None.
    src_landmarks: list[np.ndarray] | None = None
    trg_landmarks: list[np.ndarray] | None = None
    # The images as given (paths or sitk.Image), to load them on other grids.
    src_items: list = field(default_factory=list)
    trg_items: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


def _check_finite(arr: np.ndarray, what: str) -> None:
    """``what`` names the image, e.g. "source image 'a.nii.gz'"."""
    if not np.isfinite(arr).all():
        raise IstnError(f"{what} contains NaN or Inf values; clean or mask them first")


def load_volume(path: Path | sitk.Image, cfg: Config, kind: str,
                mask_path: Path | None = None, what: str = "image",
                reference: sitk.Image | None = None
                ) -> tuple[np.ndarray, sitk.Image, sitk.Image]:
    """Read, normalise and resample one image. Returns (array, resampled image, file image).

    ``path`` is a file or an image already in memory (then nothing is read or cached).
    ``kind`` selects the normaliser: 'img' (normalizer_img), 'seg' (normalizer_seg)
    or 'raw' (none; landmark images and masks). The network grid follows the config
    (``grid_orientation``, ``grid_centre``: the centre of mass is taken inside the
    mask when one is given), unless ``reference`` (a resampled image) is given: then
    its grid is used, so a segmentation or landmark image lands exactly on its
    image's network grid. File results are cached on disk (:mod:`istn.cache`); on a
    hit the file image has the file's geometry but zero pixels (callers use only its
    geometry).
    """
    if isinstance(path, sitk.Image):
        mask = sitk.GetArrayFromImage(read_image(mask_path, "mask")) if mask_path else None
        out, res = prepare_volume(path, cfg, kind, mask, what, reference)
        return out, res, path
    norm = {"img": cfg.normalizer_img, "seg": cfg.normalizer_seg, "raw": "none"}[kind]
    grid = (_grid_of(reference) if reference is not None
            else {"orientation": cfg.grid_orientation, "centre": cfg.grid_centre})

    def key_now() -> str | None:
        return cache.volume_key(path, mask_path, kind, norm, cfg.size, cfg.spacing, grid)

    key = key_now() if cache.enabled() else None
    if key is not None and (hit := cache.read_volume(key)) is not None:
        return hit
    img = read_image(path, what)
    mask = None
    if mask_path is not None:
        mimg = read_image(mask_path, "mask")
        if mimg.GetSize() != img.GetSize():
            raise IstnError(f"mask '{mask_path}' has size {mimg.GetSize()} but its image "
                            f"'{path}' has size {img.GetSize()}; masks must match their image")
        mask = sitk.GetArrayFromImage(mimg)
    out, res = prepare_volume(img, cfg, kind, mask, f"{what} '{path}'", reference)
    # Only validated results reach this point. Store them unless a file changed while
    # it was read (the key would not describe the content) or is too recent to trust.
    if key is not None and cache.settled(path, mask_path) and key_now() == key:
        cache.write_volume(key, out, res, img)
    return out, res, img


def prepare_volume(img: sitk.Image, cfg: Config, kind: str, mask: np.ndarray | None = None,
                   what: str = "image", reference: sitk.Image | None = None
                   ) -> tuple[np.ndarray, sitk.Image]:
    """Normalise and resample an image in memory: (array on the network grid, that grid).

    As :func:`load_volume` (same normalisers and grids), without files or cache;
    ``what`` names the image in errors.
    """
    norm = {"img": cfg.normalizer_img, "seg": cfg.normalizer_seg, "raw": "none"}[kind]
    if img.GetDimension() != cfg.dim:
        raise IstnError(f"{what} is {img.GetDimension()}D but the config is {cfg.dim}D "
                        f"(size {cfg.size}); {img.GetDimension()}D images need a "
                        f"{img.GetDimension()}D config (istn train/test: --config or --mode3d; "
                        f"istn register: a model trained on {img.GetDimension()}D images)")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise IstnError(f"{what} has {img.GetNumberOfComponentsPerPixel()} components per "
                        "voxel; give a scalar (grey-value) image")
    arr = sitk.GetArrayFromImage(img)
    if mask is not None and mask.shape != arr.shape:
        raise IstnError(f"the mask of {what} has shape {mask.shape} but the image has "
                        f"{arr.shape}; masks must match their image")
    _check_finite(arr, what)
    # An empty SoI is legitimate: keep zeros rather than divide by 0.
    used = "none" if kind == "seg" and not arr.any() else norm
    norm_img = sitk.GetImageFromArray(normalise(arr, used, mask, what))
    norm_img.CopyInformation(img)
    if reference is not None:
        res = resample_onto(norm_img, reference.GetOrigin(), reference.GetSpacing(),
                            reference.GetDirection(), reference.GetSize())
    else:
        # The centre of mass of the file's intensities, not of the normalised ones:
        # normalisers may shift the background away from zero.
        centre = centre_of_mass(img, mask) if cfg.grid_centre == "mass" else None
        res = resample(norm_img, cfg.spacing, cfg.size, orientation=cfg.grid_orientation,
                       centre=centre)
    return sitk.GetArrayFromImage(res), res


def finer_grid(grid: Geometry, factor: int) -> sitk.Image:
    """A blank image on ``grid``'s extent ``factor`` times finer: same origin and direction,
    spacing / factor, (n - 1) * factor + 1 voxels per axis.

    Normalised coordinates (-1 and +1 at the first and last voxel centres) name the same
    physical points on both grids, so network-grid parameters apply to it unchanged.
    """
    size = [(int(n) - 1) * factor + 1 for n in grid.size]
    img = sitk.Image(size, sitk.sitkFloat32)
    img.SetOrigin([float(v) for v in grid.origin])
    img.SetSpacing([float(v) / factor for v in grid.spacing])
    img.SetDirection([float(v) for v in grid.direction.ravel()])
    return img


def load_finer(cfg: Config, images: Sequence[Path | sitk.Image], grids: Sequence[Geometry],
               factor: int) -> torch.Tensor:
    """Images normalised as the networks see them, on their network grids made ``factor``
    times finer (:func:`finer_grid`): [N, 1, *fine shape]."""
    out = [load_volume(img, cfg, "img", None, "image", finer_grid(g, factor))[0]
           for img, g in zip(images, grids, strict=True)]
    return torch.from_numpy(np.stack(out)[:, None].astype(np.float32))


def soi_structures(img: sitk.Image, cfg: Config, what: str) -> list[sitk.Image]:
    """The structures of a multi-channel SoI file as scalar float32 images, one per channel.

    With config 'labels' the SoI is a label map (integer values) and channel ``k`` is 1
    where it equals ``labels[k]``, else 0 (one-hot); otherwise it holds 'soi_components'
    probability maps as the components of a multi-component image (component ``k``:
    channel ``k``). ``img`` is read with every component (``read_image(...,
    components=True)``); ``what`` names the file in errors.
    """
    n = img.GetNumberOfComponentsPerPixel()
    if cfg.labels is None:
        if n != cfg.soi_components:
            raise IstnError(f"{what} has {n} component(s) per voxel but config key "
                            f"'soi_components' is {cfg.soi_components}: give one component "
                            "per structure (a multi-component image, e.g. .nii.gz, .mha, "
                            ".nrrd)")
        return [sitk.VectorIndexSelectionCast(img, k, sitk.sitkFloat32) for k in range(n)]
    if n != 1:
        raise IstnError(f"{what} has {n} components per voxel but config key 'labels' "
                        f"{cfg.labels} reads a label map (one integer label per voxel)")
    arr = sitk.GetArrayFromImage(img)
    _check_finite(arr, what)
    if not np.allclose(arr, np.round(arr)):
        raise IstnError(f"{what} is not a label map (non-integer values) but config key "
                        f"'labels' is {cfg.labels}: give integer label maps, or set 'labels' "
                        "to null for a soft (single-structure) SoI")
    labels = np.round(arr)
    out = []
    for v in cfg.labels:
        channel = sitk.GetImageFromArray((labels == v).astype(np.float32))
        channel.CopyInformation(img)
        out.append(channel)
    return out


def load_soi(path: Path | sitk.Image, cfg: Config, reference: sitk.Image, what: str
             ) -> tuple[np.ndarray, sitk.Image, set[int]]:
    """A multi-channel SoI on ``reference``'s network grid: (array [C, *shape], file
    image, label values found in the file (label maps; else empty)).

    Channels of :func:`soi_structures`, each resampled linearly as a single-channel SoI
    is: one-hot label channels are not normalised (they are 0/1), probability maps get
    'normalizer_seg' per component. Not cached (:mod:`istn.cache` holds one channel).
    """
    img = path if isinstance(path, sitk.Image) else read_image(path, what, components=True)
    name = what if isinstance(path, sitk.Image) else f"{what} '{path}'"
    if isinstance(path, sitk.Image) and cfg.labels is None:
        img = sitk.Cast(img, sitk.sitkVectorFloat32)
    found = set()
    if cfg.labels is not None and img.GetNumberOfComponentsPerPixel() == 1:
        values = sitk.GetArrayViewFromImage(img)
        found = {int(v) for v in np.unique(np.round(values[np.isfinite(values)]))}
    kind = "raw" if cfg.labels is not None else "seg"
    arrays = [prepare_volume(ch, cfg, kind, None, name, reference)[0]
              for ch in soi_structures(img, cfg, name)]
    return np.stack(arrays), img, found


def _grid_of(reference: sitk.Image) -> dict[str, list[float]]:
    """A reference grid as plain numbers (part of the cache key of images resampled onto it)."""
    return {"origin": [float(v) for v in reference.GetOrigin()],
            "direction": [float(v) for v in reference.GetDirection()],
            "spacing": [float(v) for v in reference.GetSpacing()],
            "size": [int(v) for v in reference.GetSize()]}


def load_pairs(cfg: Config, images: str | Path, segs: str | Path | None = None,
               masks: str | Path | None = None, points: str | Path | None = None,
               transforms: str | Path | None = None, part: tuple[int, int] = (0, 1)
               ) -> PairSet:
    """Load the pairs listed in the CSVs onto the network grid (images normalised).

    ``part=(rank, world)`` loads every ``world``-th pair from ``rank`` only (a shard
    of a multi-process run); the CSVs are checked in full either way.
    """
    pairs = read_pair_csv(images, "image")
    extra: dict[str, list[tuple[Path, Path]] | None] = {}
    for key, path in (("seg", segs), ("mask", masks), ("points", points),
                      ("transforms", transforms)):
        extra[key] = read_pair_csv(path, key) if path is not None else None
        if extra[key] is not None and len(extra[key]) != len(pairs):
            raise IstnError(f"{key} CSV '{path}' lists {len(extra[key])} pairs but image CSV "
                            f"'{images}' lists {len(pairs)}; the CSVs must be parallel")
    rank, world = part
    names = pair_names([s for s, _ in pairs])[rank::world]  # unique over every shard
    pairs = pairs[rank::world]
    extra = {k: v[rank::world] if v is not None else None for k, v in extra.items()}
    return load_pair_lists(cfg, pairs, extra["seg"], extra["mask"], extra["points"],
                           extra["transforms"], names)


def pair_names(sources: list[Path | sitk.Image]) -> list[str]:
    """A unique name per pair: the source file's stem (``pairN`` for an image in memory).

    Where stems repeat (``sub-01/anat/T1w.nii.gz``, ``sub-02/anat/T1w.nii.gz``) the
    shortest run of parent folders that tells them apart is prepended
    (``sub-01_anat_T1w``); output files and result rows are named after it.
    """
    def name(i: int, depth: int) -> str:
        s = sources[i]
        if isinstance(s, sitk.Image):
            return f"pair{i + 1}"
        folders = list(Path(s).parent.parts[1:] if Path(s).is_absolute()
                       else Path(s).parent.parts)
        kept = folders[max(len(folders) - depth, 0):] if depth else []
        return "_".join([*kept, Path(s).name.split(".")[0]])

    depth = [0] * len(sources)
    while True:
        names = [name(i, d) for i, d in enumerate(depth)]
        counts = Counter(names)
        # files that share a name (not one file listed twice) take one more folder
        distinct = Counter(n for n, _ in {(n, str(s)) for n, s in zip(names, sources, strict=True)})
        grow = [i for i, n in enumerate(names)
                if distinct[n] > 1 and name(i, depth[i] + 1) != n]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: Counter[str] = Counter()
    for i, n in enumerate(names):  # the same file listed twice: number the repeats
        seen[n] += 1
        if counts[n] > 1 and seen[n] > 1:
            names[i] = f"{n}_{seen[n]}"
    return names


Pairs = list[tuple[Path, Path]]
# A pair's images: files, or images already in memory (register, the Python API).
ImagePairs = list[tuple[Path | sitk.Image, Path | sitk.Image]]


def _point_csvs(points: Pairs | None) -> bool:
    """True if the landmark list names point CSVs (x,y[,z]) rather than landmark images."""
    if not points:
        return False
    kinds = {str(p).lower().endswith(".csv") for pair in points for p in pair}
    if len(kinds) > 1:
        raise IstnError("the points CSV mixes landmark images and point CSV files; "
                        "use one kind for every pair")
    return kinds.pop()


def _check_same_size(seg: sitk.Image, seg_path, img: sitk.Image, img_path) -> None:
    if seg.GetSize() != img.GetSize():
        raise IstnError(f"segmentation '{seg_path}' has size {list(seg.GetSize())} but its "
                        f"image '{img_path}' has size {list(img.GetSize())}; segmentations "
                        "must match their image")


def load_pair_lists(cfg: Config, pairs: ImagePairs, segs: Pairs | None = None,
                    masks: Pairs | None = None, points: Pairs | None = None,
                    transforms: Pairs | None = None, names: list[str] | None = None
                    ) -> PairSet:
    """Load pairs given as parallel lists of (source, target) onto the network grid.

    The images of ``pairs`` are paths or ``sitk.Image`` objects; ``names`` defaults
    to :func:`pair_names`.
    """
    extra = {"seg": segs, "mask": masks, "points": points, "transforms": transforms}
    keys = ("src", "trg", "src_seg", "trg_seg", "src_pts", "trg_pts")
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    ps = PairSet(names=[], src=torch.empty(0), trg=torch.empty(0))
    point_csvs = _point_csvs(points)
    multi = cfg.soi_names is not None  # config 'labels' / 'soi_components': C channels
    found: set[int] = set()  # label values seen in the label maps
    if point_csvs:
        ps.src_landmarks, ps.trg_landmarks = [], []
    for i, (s, t) in enumerate(pairs):
        ms, mt = extra["mask"][i] if extra["mask"] else (None, None)
        sa, sres, sfile = load_volume(s, cfg, "img", ms, "source image")
        ta, tres, tfile = load_volume(t, cfg, "img", mt, "target image")
        arrays["src"].append(sa)
        arrays["trg"].append(ta)
        ps.src_items.append(s)
        ps.trg_items.append(t)
        if point_csvs:
            ss, ts = extra["points"][i]
            ps.src_landmarks.append(Geometry.of(sres).to_index(read_points(ss, cfg.dim)))
            ps.trg_landmarks.append(Geometry.of(tres).to_index(read_points(ts, cfg.dim)))
            if len(ps.src_landmarks[-1]) != len(ps.trg_landmarks[-1]):
                raise IstnError(f"points CSVs '{ss}' and '{ts}' list different numbers of "
                                "points; rows must correspond")
        for key, kind, what in (("seg", "seg", "segmentation"), ("points", "raw", "landmarks")):
            if key == "points" and point_csvs:
                continue
            if extra[key] is not None:
                ss, ts = extra[key][i]
                prefix = "seg" if key == "seg" else "pts"
                # On the image's own network grid (its centre, not the segmentation's).
                if key == "seg" and multi:  # [C, *shape] with C structures
                    (sa_, sf_, s_found), (ta_, tf_, t_found) = (load_soi(ss, cfg, sres, what),
                                                              load_soi(ts, cfg, tres, what))
                    sv, tv = (sa_, sres, sf_), (ta_, tres, tf_)
                    found |= s_found | t_found
                else:
                    sv = load_volume(ss, cfg, kind, None, what, sres)
                    tv = load_volume(ts, cfg, kind, None, what, tres)
                if key == "seg":  # as istn register: a SoI must cover its image voxel by voxel
                    _check_same_size(sv[2], ss, sfile, s)
                    _check_same_size(tv[2], ts, tfile, t)
                arrays[f"src_{prefix}"].append(sv[0])
                arrays[f"trg_{prefix}"].append(tv[0])
        ps.src_file.append(Geometry.of(sfile))
        ps.trg_file.append(Geometry.of(tfile))
        ps.src_grid.append(Geometry.of(sres))
        ps.trg_grid.append(Geometry.of(tres))
        ps.references.append(tres)
    if segs and cfg.labels is not None:
        absent = [v for v in cfg.labels if v not in found]
        if absent:
            listed = f"'{segs[0][0]}', ... ({count(len(segs), 'pair')})"
            raise IstnError(f"config key 'labels' lists {absent} but no segmentation holds "
                            f"that value (segmentations {listed}; values found: "
                            f"{sorted(found)}); list only labels of the label maps")
    ps.names = names if names is not None else pair_names([s for s, _ in pairs])
    if extra["transforms"] is not None:
        from .synth import read_transform

        ps.transforms = [(read_transform(a), read_transform(b)) for a, b in extra["transforms"]]
    for key, vals in arrays.items():
        if vals:
            stacked = np.stack(vals)  # [N, *shape]; a multi-channel SoI: [N, C, *shape]
            channels = multi and key in ("src_seg", "trg_seg")
            setattr(ps, key, torch.from_numpy(stacked if channels else stacked[:, None]).float())
    return ps

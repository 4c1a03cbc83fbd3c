"""Seeded synthetic registration data with ground truth, in 2D and 3D.

The data mimic the published ISTN synthetic 2D set: a bright box (255) on a black
background holds a dark branching vessel tree (100).  The tree and the box get
*independent* random affine transforms, so aligning intensities aligns the box and not
the tree; the structure of interest (SoI, ``*_seg``) is a blurred map of the tree and
``*_points`` holds blurred discs (balls in 3D) at the tree's branch points.  In 3D (64^3
by default) the tubes are 4-6 voxels across and the SoI is blurred only a little, so that,
as in 2D, the SoI is explained by the dark tree and not by the box: with thinner tubes and
a blob-like SoI, ISTN-i learned to mark the box and ended worse than no registration.

Ground truth: ``*_transform.txt`` holds a 4x4 homogeneous matrix ``T`` with
``image(p) = template(T @ p)``, where ``p = (x, y[, z], 1)`` is in voxel indices
(x = column, origin at the first voxel centre).  For a pair, the source point ``p`` and
the target point ``inv(T_trg) @ T_src @ p`` show the same tree location.

Every image is rendered by warping templates drawn once per dataset (signed distance to
the tree, blurred SoI, blurred landmarks) with ``scipy.ndimage.affine_transform`` (linear
interpolation); the box is evaluated analytically.  All randomness comes from
``numpy.random.default_rng`` seeded from ``seed`` (one stream for the template and one per
split), so the output is byte for byte reproducible.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from istn import layout
from istn.errors import IstnError
from istn.io import write_atomically, write_image

__all__ = ["generate", "read_transform", "SPLITS"]

SPLITS = ("train", "val", "test")

_BOX_VALUE = 255.0
_TREE_VALUE = 100.0
_SOI_MAX = 200.0
_POINTS_MAX = 200.0
_MIN_SIZE = 32
_MAX_TRIES = 500


@dataclass(frozen=True)
class _Style:
    """Per-dimension look of the data (lengths in voxels unless a fraction of the size)."""

    default_size: int
    spacing: float
    batch_size: int
    ext: str
    max_rot_deg: float  # per rotation angle
    max_shift: float  # translation, fraction of the size per axis
    max_shear: float
    scale: tuple[float, float]
    tube_radius: tuple[float, float]  # at the root, at the tips
    point_radius: float
    point_sigma: float
    min_point_sep: float  # between branch points, so their blobs never merge
    soi_extra: float  # dilation of the tubes before blurring into the SoI
    soi_sigma: float
    box_half: float  # half side of the box, fraction of the size
    tree_half: float  # template tree stays in this centred box, fraction of the size
    trunk: float  # trunk length, fraction of the mean size
    branch_angle: tuple[float, float]  # degrees between a child and its parent
    depth: int  # levels of binary branching (2**depth - 1 branch points)
    shrink: tuple[float, float]  # child / parent branch length
    min_gap: float  # between skeletons of branches that do not meet


_STYLES = {
    2: _Style(
        default_size=128,
        spacing=1.0,
        batch_size=10,
        ext="png",
        max_rot_deg=15.0,
        max_shift=0.06,
        max_shear=0.05,
        scale=(0.9, 1.1),
        tube_radius=(2.2, 1.4),
        point_radius=5.0,
        point_sigma=2.0,
        min_point_sep=16.0,
        soi_extra=3.0,
        soi_sigma=4.5,
        box_half=0.37,
        tree_half=0.42,
        trunk=0.3,
        branch_angle=(25.0, 50.0),
        depth=3,
        shrink=(0.65, 0.8),
        min_gap=10.0,
    ),
    3: _Style(
        default_size=64,
        spacing=2.0,
        batch_size=2,
        ext="nii.gz",
        max_rot_deg=10.0,
        max_shift=0.05,
        max_shear=0.04,
        scale=(0.9, 1.1),
        # Tubes 4-6 voxels across at 64^3, so they survive the ITN's two 2x poolings;
        # a thin tube (the earlier 3-4 voxels) let the ITN settle for marking the box.
        tube_radius=(3.0, 2.0),
        point_radius=2.5,
        point_sigma=1.0,
        min_point_sep=10.0,
        # Little dilation and blur: the SoI stays tree-shaped instead of a blob that a
        # box-shaped ITN output fits nearly as well.
        soi_extra=1.5,
        soi_sigma=2.0,
        box_half=0.36,  # a little larger, so less of the longer tree sticks out of it
        tree_half=0.4,
        trunk=0.32,
        branch_angle=(30.0, 55.0),
        depth=3,
        shrink=(0.7, 0.85),
        min_gap=9.0,  # > two root radii, so thicker tubes never touch
    ),
}


def _scaled_style(style: _Style, size: np.ndarray) -> _Style:
    """The style with its voxel lengths scaled to the image size (identity at the default)."""
    f = float(np.mean(size)) / style.default_size
    return replace(
        style,
        tube_radius=(style.tube_radius[0] * f, style.tube_radius[1] * f),
        point_radius=style.point_radius * f,
        point_sigma=style.point_sigma * f,
        min_point_sep=style.min_point_sep * f,
        soi_extra=style.soi_extra * f,
        soi_sigma=style.soi_sigma * f,
        min_gap=style.min_gap * f,
    )


# ----------------------------------------------------------------------------- transforms


def read_transform(path: str | Path) -> np.ndarray:
    """Reads a 4x4 homogeneous matrix (4 rows of 4 numbers, tab/space/comma separated)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise IstnError(f"cannot read transform file {path}: {exc}") from exc
    rows = [line.replace(",", " ").split() for line in text.splitlines() if line.strip()]
    if len(rows) != 4 or any(len(r) != 4 for r in rows):
        shape = [len(r) for r in rows]
        raise IstnError(
            f"transform file {path} must hold 4 rows of 4 numbers (found row lengths {shape})"
        )
    try:
        mat = np.array([[float(v) for v in r] for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise IstnError(f"transform file {path} holds a value that is not a number: {exc}") from exc
    if not np.all(np.isfinite(mat)):
        raise IstnError(f"transform file {path} holds a non-finite value")
    return mat


def _format_transform(mat: np.ndarray) -> str:
    return "".join("\t".join(f"{v + 0.0:.9g}" for v in row) + "\n" for row in mat)


def _rotation(dim: int, angles: np.ndarray) -> np.ndarray:
    if dim == 2:
        c, s = np.cos(angles[0]), np.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = r @ rot
    return rot


def _random_affine(rng: np.random.Generator, style: _Style, size: np.ndarray) -> np.ndarray:
    """A random 4x4 affine about the image centre; the written (rounded) values are returned."""
    dim = len(size)
    n_angles = 1 if dim == 2 else 3
    angles = np.radians(rng.uniform(-style.max_rot_deg, style.max_rot_deg, n_angles))
    scale = rng.uniform(*style.scale, dim)
    shear = np.eye(dim)
    iu = np.triu_indices(dim, 1)
    shear[iu] = rng.uniform(-style.max_shear, style.max_shear, len(iu[0]))
    shift = rng.uniform(-style.max_shift, style.max_shift, dim) * size
    a = _rotation(dim, angles) @ np.diag(scale) @ shear
    centre = (size - 1) / 2.0
    mat = np.eye(4)
    mat[:dim, :dim] = a
    mat[:dim, 3] = centre + shift - a @ centre
    # Render with exactly what the file will say.
    return np.array([[float(f"{v:.9g}") for v in row] for row in mat])


def _apply(mat: np.ndarray, pts: np.ndarray) -> np.ndarray:
    dim = pts.shape[1]
    return pts @ mat[:dim, :dim].T + mat[:dim, 3]


# ---------------------------------------------------------------------------------- tree


@dataclass
class _Tree:
    seg_a: np.ndarray  # (n, dim) segment starts, (x, y[, z])
    seg_b: np.ndarray  # (n, dim) segment ends
    radius: np.ndarray  # (n,)
    branch_points: np.ndarray  # (k, dim)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    while True:
        v = rng.normal(size=d.shape)
        v = v - (v @ d) * d
        n = np.linalg.norm(v)
        if n > 1e-3:
            return v / n


def _rotate_about(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation of v about the unit axis."""
    c, s = np.cos(angle), np.sin(angle)
    return v * c + np.cross(axis, v) * s + axis * (axis @ v) * (1 - c)


def _child_directions(rng: np.random.Generator, d: np.ndarray, style: _Style) -> list[np.ndarray]:
    lo, hi = np.radians(style.branch_angle)
    a1, a2 = rng.uniform(lo, hi, 2)
    if d.shape[0] == 2:
        n = np.array([-d[1], d[0]])
        return [np.cos(a1) * d + np.sin(a1) * n, np.cos(a2) * d - np.sin(a2) * n]
    p1 = _perpendicular(rng, d)
    p2 = -_rotate_about(p1, d, rng.uniform(-np.pi / 4, np.pi / 4))
    return [np.cos(a1) * d + np.sin(a1) * p1, np.cos(a2) * d + np.sin(a2) * p2]


def _random_tree(rng: np.random.Generator, style: _Style, size: np.ndarray) -> _Tree:
    """A random binary branching tree whose skeleton stays in the centred template box.

    Small images get fewer branching levels when the full tree does not fit.
    """
    for depth in range(style.depth, 0, -1):
        tree = _try_tree(rng, style, size, depth)
        if tree is not None:
            return tree
    raise IstnError(f"could not fit a synthetic tree into size {size.tolist()}; use a larger size")


def _try_tree(
    rng: np.random.Generator, style: _Style, size: np.ndarray, max_depth: int
) -> _Tree | None:
    dim = len(size)
    centre = (size - 1) / 2.0
    half = style.tree_half * size
    r_root, r_tip = style.tube_radius
    for _ in range(_MAX_TRIES):
        # Root on a sphere/circle around the centre, heading roughly inwards.
        start = centre + half * 0.95 * _unit(rng.normal(size=dim))
        start = np.clip(start, centre - half, centre + half)
        heading = _unit(centre - start + rng.normal(scale=0.25 * half.mean(), size=dim))
        seg_a, seg_b, radius, branch, owner = [], [], [], [], []
        stack = [(start, heading, style.trunk * size.mean(), 0)]
        n_branches = 0
        while stack:
            pos, d, length, depth = stack.pop()
            me = n_branches
            n_branches += 1
            n_sub = 4
            for k in range(n_sub):
                # Gentle wiggle: a random walk of the heading.
                d = _unit(d + rng.normal(scale=0.12, size=dim))
                nxt = pos + d * length / n_sub
                frac = (depth + (k + 0.5) / n_sub) / (max_depth + 1)
                seg_a.append(pos)
                seg_b.append(nxt)
                radius.append(r_root + (r_tip - r_root) * frac)
                owner.append(me)
                pos = nxt
            if depth < max_depth:
                branch.append(pos)
                for cd in _child_directions(rng, d, style):
                    stack.append((pos, _unit(cd), length * rng.uniform(*style.shrink), depth + 1))
        a, b, bp = np.array(seg_a), np.array(seg_b), np.array(branch)
        nodes = np.concatenate([a, b])
        if np.any(nodes < centre - half) or np.any(nodes > centre + half):
            continue
        dist = np.linalg.norm(bp[:, None] - bp[None], axis=-1)
        dist[np.diag_indices(len(bp))] = np.inf
        if dist.min() < style.min_point_sep:
            continue
        if _branches_too_close(a, b, np.array(owner), bp, style.min_gap):
            continue
        return _Tree(a, b, np.array(radius), bp)
    return None


def _branches_too_close(
    seg_a: np.ndarray, seg_b: np.ndarray, owner: np.ndarray, junctions: np.ndarray, gap: float
) -> bool:
    """True when two branches come closer than gap away from the junctions they share."""
    t = np.linspace(0.0, 1.0, 5)[:, None, None]
    pts = (seg_a[None] + t * (seg_b - seg_a)[None]).reshape(-1, seg_a.shape[1])
    own = np.tile(owner, len(t))
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    near = np.linalg.norm(pts[:, None] - junctions[None], axis=-1) < 1.5 * gap  # (P, J)
    exempt = (own[:, None] == own[None]) | ((near[:, None, :] & near[None, :, :]).any(-1))
    return bool(np.any(dist[~exempt] < gap))


def _segments_sdf(
    shape_xyz: np.ndarray,
    offset: float,
    seg_a: np.ndarray,
    seg_b: np.ndarray,
    radius: np.ndarray,
    cutoff: float,
) -> np.ndarray:
    """min over segments of (distance to the segment - radius), clipped at cutoff.

    The grid has shape_xyz voxels per axis (x, y[, z]); voxel index i is at coordinate
    i - offset.  Returned in numpy order ((z,) y, x).  Each segment only touches its own
    bounding box (grown by cutoff), so this stays cheap in 3D.
    """
    dim = len(shape_xyz)
    out = np.full(tuple(int(s) for s in shape_xyz[::-1]), cutoff, dtype=np.float64)
    for a, b, r in zip(seg_a, seg_b, radius, strict=True):
        lo = np.maximum(np.floor(np.minimum(a, b) - cutoff - r + offset), 0).astype(int)
        hi = np.minimum(np.ceil(np.maximum(a, b) + cutoff + r + offset) + 1, shape_xyz)
        hi = hi.astype(int)
        if np.any(hi <= lo):
            continue
        ab = b - a
        ab2 = float(ab @ ab)
        # Per-axis 1D coordinates relative to a, broadcast in numpy axis order.
        rel = []
        for ax in range(dim):
            c = np.arange(lo[ax], hi[ax], dtype=np.float64) - offset - a[ax]
            shp = [1] * dim
            shp[dim - 1 - ax] = -1
            rel.append(c.reshape(shp))
        dot = sum(rel[ax] * ab[ax] for ax in range(dim))
        norm2 = sum(rel[ax] ** 2 for ax in range(dim))
        if ab2 > 0:
            t = np.clip(dot / ab2, 0.0, 1.0)
            d2 = norm2 - 2 * t * dot + t * t * ab2
        else:
            d2 = norm2 + 0 * dot
        d = np.sqrt(np.maximum(d2, 0.0)) - r
        view = out[tuple(slice(lo[ax], hi[ax]) for ax in reversed(range(dim)))]
        np.minimum(view, d, out=view)
    return np.minimum(out, cutoff)


@dataclass
class _Templates:
    margin: int
    tree_sdf: np.ndarray
    soi: np.ndarray
    points: np.ndarray
    cutoff: float
    tree: _Tree


def _make_templates(rng: np.random.Generator, style: _Style, size: np.ndarray) -> _Templates:
    tree = _random_tree(rng, style, size)
    margin = int(np.ceil(4 * max(style.soi_sigma, style.point_sigma) + style.soi_extra + 4))
    shape = size + 2 * margin
    cutoff = float(style.soi_extra + 4 * style.soi_sigma + 4)
    sdf = _segments_sdf(shape, margin, tree.seg_a, tree.seg_b, tree.radius, cutoff)
    soi = ndimage.gaussian_filter(np.clip(0.5 + style.soi_extra - sdf, 0.0, 1.0), style.soi_sigma)
    soi *= _SOI_MAX / soi.max()
    bp = tree.branch_points
    pr = np.full(len(bp), style.point_radius)
    pts_sdf = _segments_sdf(shape, margin, bp, bp, pr, 4.0)
    pts = ndimage.gaussian_filter(np.clip(0.5 - pts_sdf, 0.0, 1.0), style.point_sigma)
    pts *= _POINTS_MAX / pts.max()
    return _Templates(margin, sdf, soi, pts, cutoff, tree)


def _tree_fits(mat: np.ndarray, tree: _Tree, style: _Style, size: np.ndarray) -> bool:
    """True when the whole tree and every landmark blob lie inside the image."""
    inv = np.linalg.inv(mat)
    nodes = _apply(inv, np.concatenate([tree.seg_a, tree.seg_b]))
    m_tree = style.tube_radius[0] + 2.0
    if np.any(nodes < m_tree) or np.any(nodes > size - 1 - m_tree):
        return False
    bp = _apply(inv, tree.branch_points)
    m_pt = style.point_radius * 1.1 + 3 * style.point_sigma + 1.0
    return not (np.any(bp < m_pt) or np.any(bp > size - 1 - m_pt))


def _draw_tree_transform(
    rng: np.random.Generator, style: _Style, size: np.ndarray, tree: _Tree
) -> np.ndarray:
    for _ in range(_MAX_TRIES):
        mat = _random_affine(rng, style, size)
        if _tree_fits(mat, tree, style, size):
            return mat
    raise IstnError(f"could not keep the synthetic tree inside size {size.tolist()}")


# ------------------------------------------------------------------------------ rendering


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(a, 0, 255)).astype(np.uint8)


def _render(
    tpl: _Templates,
    grid: np.ndarray,
    tree_mat: np.ndarray,
    box_mat: np.ndarray,
    style: _Style,
    size: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, SoI and landmark maps (uint8, numpy order) of one random instance.

    grid holds the voxel coordinates (dim, N) in (x, y[, z]) order.
    """
    dim = len(size)
    shape = tuple(int(s) for s in size[::-1])
    # Template index (numpy order) of output voxel o (numpy order): A_np @ o + offset_np.
    a_np = tree_mat[:dim, :dim][::-1, ::-1]
    off_np = (tree_mat[:dim, 3] + tpl.margin)[::-1]

    def warp(field: np.ndarray, cval: float) -> np.ndarray:
        return ndimage.affine_transform(
            field, a_np, offset=off_np, output_shape=shape, order=1, mode="constant", cval=cval
        )

    tree = np.clip(0.5 - warp(tpl.tree_sdf, tpl.cutoff), 0.0, 1.0)
    soi = warp(tpl.soi, 0.0)
    pts = warp(tpl.points, 0.0)
    # Box: analytic (approximate) signed distance in its own template frame.
    centre = (size - 1) / 2.0
    qb = box_mat[:dim, :dim] @ grid + (box_mat[:dim, 3] - centre)[:, None]
    box_sdf = np.abs(qb[0]) - style.box_half * size[0]
    for ax in range(1, dim):
        np.maximum(box_sdf, np.abs(qb[ax]) - style.box_half * size[ax], out=box_sdf)
    box = np.clip(0.5 - box_sdf.reshape(shape), 0.0, 1.0)
    image = _BOX_VALUE * box * (1.0 - tree) + _TREE_VALUE * tree
    return _to_uint8(image), _to_uint8(soi), _to_uint8(pts)


# -------------------------------------------------------------------------------- writing


def _write_text(path: Path, text: str) -> None:
    """Writes text atomically, with ``\\n`` line ends on every platform (same bytes)."""
    write_atomically(path, lambda tmp: tmp.write_text(text, newline="\n"))


def _write_image(arr: np.ndarray, path: Path, spacing: float) -> None:
    img = sitk.GetImageFromArray(arr)
    dim = arr.ndim
    img.SetSpacing([float(spacing)] * dim)
    img.SetOrigin([0.0] * dim)
    img.SetDirection(np.eye(dim).ravel().tolist())
    try:
        write_image(img, path)  # atomically: a crash leaves no half-written image
    except RuntimeError as exc:
        raise IstnError(f"cannot write image {path}: {exc}") from exc


def _check_args(
    dim: int, counts: dict[str, int], size: Sequence[int] | None, seed: int
) -> np.ndarray:
    if isinstance(dim, bool) or dim not in (2, 3):
        raise IstnError(f"dim must be 2 or 3, got {dim!r}")
    for split, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise IstnError(f"n_{split} must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise IstnError(f"seed must be a non-negative integer, got {seed!r}")
    if sum(counts.values()) == 0:
        raise IstnError("nothing to generate: n_train, n_val and n_test are all 0")
    if size is None:
        return np.full(dim, _STYLES[dim].default_size, dtype=np.int64)
    try:
        arr = np.array([int(s) for s in size], dtype=np.int64)
        ok = all(float(s) == int(s) for s in size)
    except (TypeError, ValueError) as exc:
        raise IstnError(f"size must be {dim} integers (x, y[, z]), got {size!r}") from exc
    if not ok or len(arr) != dim or np.any(arr < _MIN_SIZE):
        raise IstnError(
            f"size must be {dim} integers >= {_MIN_SIZE} in (x, y[, z]) order, got {list(size)}"
        )
    return arr


def generate(
    out_dir: str | Path,
    dim: int = 2,
    n_train: int = 100,
    n_val: int = 0,
    n_test: int = 0,
    size: Sequence[int] | None = None,
    seed: int = 0,
) -> Path:
    """Writes a dataset and returns out_dir.

    size is in (x, y[, z]) order; default 128x128 (2D), 64^3 (3D).

    Per split with pairs: ``<split>/V_square_{source,target}{i}{,_seg,_points}.{png|nii.gz}``
    and ``..._transform.txt``; then ``<split>.csv``, ``<split>.seg.csv``,
    ``<split>.points.csv``, ``<split>.transforms.csv`` (header ``src,trg``, paths relative
    to out_dir) and ``config.json``.  Images are uint8; 3D volumes have 2 mm spacing.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    size_arr = _check_args(dim, counts, size, seed)
    style = _scaled_style(_STYLES[dim], size_arr)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise IstnError(f"output folder {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IstnError(f"cannot create output folder {out}: {exc}") from exc
    # Drop index files of the splits being rewritten first: after a crash no CSV can point
    # at a half-written split.
    todo = [s for s in SPLITS if counts[s] > 0]
    for split in todo:
        for kind in layout.DATASET_KINDS:
            layout.dataset_csv(out, split, kind).unlink(missing_ok=True)

    seq = np.random.SeedSequence(int(seed))
    tpl_seq, *split_seqs = seq.spawn(1 + len(SPLITS))
    tpl = _make_templates(np.random.default_rng(tpl_seq), style, size_arr)

    axes = [np.arange(int(s), dtype=np.float64) for s in size_arr]
    mesh = np.meshgrid(*axes[::-1], indexing="ij")  # numpy order
    grid = np.stack([m.ravel() for m in mesh[::-1]])  # (dim, N) in (x, y[, z]) order

    ext = style.ext
    index: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for split, sseq in zip(SPLITS, split_seqs, strict=True):
        n = int(counts[split])
        if n == 0:
            continue
        rng = np.random.default_rng(sseq)
        folder = out / split
        folder.mkdir(exist_ok=True)
        rows: dict[str, list[tuple[str, str]]] = {kind: [] for kind in layout.DATASET_KINDS}
        for i in range(1, n + 1):
            names = {}
            for role in ("source", "target"):
                tree_mat = _draw_tree_transform(rng, style, size_arr, tpl.tree)
                box_mat = _random_affine(rng, style, size_arr)
                img, soi, pts = _render(tpl, grid, tree_mat, box_mat, style, size_arr)
                stem = f"V_square_{role}{i}"
                _write_image(img, folder / f"{stem}.{ext}", style.spacing)
                _write_image(soi, folder / f"{stem}_seg.{ext}", style.spacing)
                _write_image(pts, folder / f"{stem}_points.{ext}", style.spacing)
                _write_text(folder / f"{stem}_transform.txt", _format_transform(tree_mat))
                names[role] = f"{split}/{stem}"
            src, trg = names["source"], names["target"]
            rows[""].append((f"{src}.{ext}", f"{trg}.{ext}"))
            rows["seg"].append((f"{src}_seg.{ext}", f"{trg}_seg.{ext}"))
            rows["points"].append((f"{src}_points.{ext}", f"{trg}_points.{ext}"))
            rows["transforms"].append((f"{src}_transform.txt", f"{trg}_transform.txt"))
        index[split] = rows

    for split, rows in index.items():
        for kind in layout.DATASET_KINDS:
            text = "src,trg\n" + "".join(f"{s},{t}\n" for s, t in rows[kind])
            _write_text(layout.dataset_csv(out, split, kind), text)
    config = {
        "epochs": 100,
        "refine": 50,
        "learning_rate": 0.001,
        "batch_size": style.batch_size,
        "val_interval": 10,
        "normalizer_img": "none",
        "normalizer_seg": "none",
        "size": [int(s) for s in size_arr],
        "spacing": [int(style.spacing)] * dim,
    }
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in config.items())
    _write_text(layout.dataset_config(out), "{\n" + body + "\n}\n")
    return out

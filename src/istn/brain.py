"""A seeded 3D brain MRI registration set with ground truth, made from the MNI152 template.

The template is the MNI152 2009a (symmetric) T1 with its grey-matter (GM) and white-matter
(WM) probability maps, read from the files the ``nilearn`` wheel ships in
``nilearn/datasets/data/`` (no download; ``pip install istn[brain]``).

Conventions (as SimpleITK uses them): points are physical ``(x, y, z)`` in mm in the ITK
LPS frame (x towards the patient's left, y posterior, z superior); sizes and spacings are
per voxel axis ``(i, j, k)``; a transform written for resampling maps points of the
output (fixed) image to points of the input (moving) image.

Each image ``n`` is the template moved by a random affine ``A_n`` (template -> image
points, about the template's brain centre ``c``: ``A_n(q) = c + M (q - c) + t`` with
``M = R · S · H``, a rotation ``R`` of at most ``max_rotation_deg`` about a random axis,
scalings ``S`` in ``1 ± max_scaling``, an upper-triangular shear ``H`` with off-diagonal
entries in ``± max_shear`` and a translation ``t`` of at most ``max_translation_mm`` per
axis), sampled with linear interpolation onto the image's own storage grid, so
``image(p) = template(T_n(p))`` with ``T_n = A_n⁻¹``.

* ``<stem>_transform.tfm``: ``T_n`` (image -> template points; the resampling direction
  that renders the image from the template).  For a pair (source s, target t) the
  ground-truth target -> source map is ``x_s = T_s⁻¹(T_t(x_t))``, see
  :func:`pair_transform`.
* Storage grid: the physical field of view is ``FOV_MM`` (x, y, z), centred on ``c``;
  the direction matrix is one of :data:`ORIENTATIONS` (DICOM-style codes naming where
  each voxel axis points: ``LPS`` = identity, ``RAS`` = x and y flipped, ``ASL`` /
  ``PIR`` sagittal storage, ``LSA`` / ``RIP`` coronal storage, ``LPI`` = z flipped),
  with probability ``p_oblique`` tilted by a rotation of at most ``max_oblique_deg``
  (the FOV box turns with it),
  and with probability ``p_thick`` the third voxel axis (the slice axis) has twice the
  in-plane spacing (``2 × 2 × 4`` mm at the default spacing).  Each axis gets
  ``round(extent / spacing)`` voxels, where ``extent`` is the FOV seen along that axis.
* Intensities: ``scale · bias(p) · (t1 / 255)^γ`` with Rician noise of standard
  deviation ``noise · scale`` (``noise`` in ``[0.01, 0.04]``), rounded to int16.
  ``bias`` is ``exp`` of a random quadratic polynomial of the image's physical
  coordinates (the scanner frame), ``γ`` in ``[0.8, 1.25]``, ``scale`` in ``[300, 3000]``.
* ``<stem>_labels.nii.gz`` (uint8): 0 background, 1 GM, 2 WM: where the warped
  ``P_GM + P_WM >= 0.5``, the tissue with the larger probability, else 0.
* ``<stem>_seg.nii.gz`` (float32): the single-channel structure map
  ``P_GM · 1 + P_WM · 2`` (values in [0, 2]) for istn's SoI.
* ``<stem>_points.csv``: ``x,y,z`` of the landmarks ``A_n(L)``, where ``L``
  (``template_points.csv``) are :func:`template_landmarks` of the template.

``nonrigid=True`` adds a smooth cubic B-spline deformation ``B_n`` on the image domain
(control points about ``bspline_mm`` apart, displacements of a few mm, no folding):
``T_n = A_n⁻¹ ∘ B_n`` written as a composite ``<stem>_transform.h5``; the landmarks are
then ``B_n⁻¹(A_n(L))`` (solved by fixed-point iteration) and the inverse ``T_n⁻¹`` is
written beside it as a displacement field ``<stem>_inverse.h5``.

Each split of ``n`` images holds ``n`` pairs: image ``k`` is the source of pair ``k`` and
its target is image ``π(k)`` for a random derangement ``π``.  The split ``test_reoriented``
holds the test targets re-stored in another orientation (:func:`sitk.DICOMOrient`: the
same voxels, the same physical content, the voxel axes permuted / flipped).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io as _io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .config import example_caps
from .errors import IstnError
from .io import write_image, write_text, write_transform

__all__ = ["generate_brain", "load_template", "template_landmarks", "pair_transform",
           "read_points_csv", "main", "ORIENTATIONS", "FOV_MM"]

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
ORIENTATIONS = ("LPS", "RAS", "LPI", "ASL", "PIR", "LSA", "RIP")
FOV_MM = (192.0, 224.0, 192.0)  # (x, y, z): the template brain with room for the motion
TISSUE_THRESHOLD = 0.5


def _direction(code: str) -> np.ndarray:
    """3x3 direction matrix (columns: the voxel axes in LPS) of a DICOM orientation code."""
    return np.array(sitk.DICOMOrientImageFilter_GetDirectionCosinesFromOrientation(code)
                    ).reshape(3, 3)


# ------------------------------------------------------------------------------ template


def template_paths() -> dict[str, Path]:
    """Paths of the MNI152 2009a T1/GM/WM files inside the installed nilearn (not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise IstnError("the brain data set needs the MNI152 template files that the nilearn "
                        "package ships; install them with: pip install istn[brain]")
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    paths = {k: data / name for k, name in TEMPLATE_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise IstnError(f"nilearn is installed but lacks the MNI152 template file {missing[0]}; "
                        "reinstall it with: pip install --force-reinstall istn[brain]")
    return paths


@dataclass(frozen=True)
class Template:
    """The MNI152 T1 (raw 0..255) and GM/WM probabilities (0..1), float32, LPS geometry."""

    t1: sitk.Image
    gm: sitk.Image
    wm: sitk.Image
    centre: np.ndarray  # physical centroid of P_GM + P_WM
    landmarks: np.ndarray  # (n, 3) physical points


def template_landmarks(gm: sitk.Image, wm: sitk.Image, n: int = 20,
                       erosion_mm: float = 4.0, stride: int = 3) -> np.ndarray:
    """``n`` spread-out physical points inside the template's brain, deterministically.

    Candidates are the voxel centres (every ``stride``-th voxel per axis) of the tissue
    mask ``P_GM + P_WM >= 0.5`` eroded by ``erosion_mm``; the first point is the candidate
    nearest the mask's centroid, each next one the candidate farthest from those chosen
    (farthest-point sampling), so the points cover the brain and none lies on its edge.
    """
    prob = sitk.GetArrayFromImage(gm) + sitk.GetArrayFromImage(wm)
    mask = prob >= TISSUE_THRESHOLD
    radius = int(round(erosion_mm / min(gm.GetSpacing())))
    mask = ndimage.binary_erosion(mask, iterations=radius)
    idx = np.argwhere(mask[::stride, ::stride, ::stride]) * stride  # (z, y, x)
    if len(idx) < n:
        raise IstnError(f"the template mask has only {len(idx)} candidate landmarks (< {n})")
    pts = _index_to_physical(gm, idx[:, ::-1].astype(float))
    chosen = [int(np.argmin(np.linalg.norm(pts - pts.mean(0), axis=1)))]
    dist = np.linalg.norm(pts - pts[chosen[0]], axis=1)
    for _ in range(n - 1):
        k = int(np.argmax(dist))
        chosen.append(k)
        dist = np.minimum(dist, np.linalg.norm(pts - pts[k], axis=1))
    return pts[chosen]


def load_template(n_landmarks: int = 20) -> Template:
    """Read the MNI152 files from the nilearn wheel (see :func:`template_paths`)."""
    paths = template_paths()
    imgs = {}
    for key, path in paths.items():
        img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
        imgs[key] = img if key == "t1" else img / 255.0
    prob = sitk.GetArrayFromImage(imgs["gm"]) + sitk.GetArrayFromImage(imgs["wm"])
    idx = np.argwhere(prob > 0)[:, ::-1].astype(float)  # (x, y, z) indices
    centre = np.average(_index_to_physical(imgs["gm"], idx), axis=0, weights=prob[prob > 0])
    pts = template_landmarks(imgs["gm"], imgs["wm"], n_landmarks)
    return Template(imgs["t1"], imgs["gm"], imgs["wm"], centre, pts)


def _index_to_physical(img: sitk.Image, idx: np.ndarray) -> np.ndarray:
    """Physical points of continuous indices (N, 3) in (i, j, k) order."""
    d = np.array(img.GetDirection()).reshape(3, 3)
    return np.array(img.GetOrigin()) + (idx * np.array(img.GetSpacing())) @ d.T


# ---------------------------------------------------------------------------- transforms


def random_affine(rng: np.random.Generator, centre: np.ndarray, max_rotation_deg: float = 15.0,
                  max_translation_mm: float = 10.0, max_scaling: float = 0.1,
                  max_shear: float = 0.05) -> sitk.AffineTransform:
    """A random affine ``A`` (template -> image points) about ``centre``; see the module doc."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(0.0, max_rotation_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k  # Rodrigues
    scale = np.diag(rng.uniform(1 - max_scaling, 1 + max_scaling, 3))
    shear = np.eye(3)
    shear[np.triu_indices(3, 1)] = rng.uniform(-max_shear, max_shear, 3)
    tx = sitk.AffineTransform(3)
    tx.SetCenter(np.asarray(centre, dtype=float).tolist())
    tx.SetMatrix((rot @ scale @ shear).ravel().tolist())
    tx.SetTranslation(rng.uniform(-max_translation_mm, max_translation_mm, 3).tolist())
    return tx


def affine_matrix(tx: sitk.Transform) -> np.ndarray:
    """4x4 homogeneous matrix of an affine-like SimpleITK transform (centre folded in)."""
    tx = sitk.AffineTransform(tx) if not isinstance(tx, sitk.AffineTransform) else tx
    m = np.array(tx.GetMatrix()).reshape(3, 3)
    c, t = np.array(tx.GetCenter()), np.array(tx.GetTranslation())
    out = np.eye(4)
    out[:3, :3] = m
    out[:3, 3] = c + t - m @ c
    return out


def matrix_to_affine(h: np.ndarray) -> sitk.AffineTransform:
    """The 4x4 homogeneous matrix as a SimpleITK ``AffineTransform`` (centre 0)."""
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(np.asarray(h[:3, :3], dtype=float).ravel().tolist())
    tx.SetTranslation(np.asarray(h[:3, 3], dtype=float).tolist())
    return tx


def _is_affine(tx: sitk.Transform) -> bool:
    try:
        sitk.AffineTransform(tx)
    except (RuntimeError, TypeError):
        return False
    return True


def pair_transform(src_tf: sitk.Transform, trg_tf: sitk.Transform,
                   src_inverse: sitk.Transform | None = None) -> sitk.Transform:
    """Ground-truth target -> source map ``x_s = T_s⁻¹(T_t(x_t))`` of a pair.

    ``src_tf``/``trg_tf`` are the images' ``*_transform`` files (image -> template).
    Two affine ones compose exactly into one ``AffineTransform``; otherwise the result
    is a ``CompositeTransform`` (SimpleITK applies its last transform first) and a
    non-affine ``T_s`` needs its inverse ``src_inverse`` (``*_inverse.h5``).
    """
    if _is_affine(src_tf) and _is_affine(trg_tf):
        return matrix_to_affine(np.linalg.inv(affine_matrix(src_tf)) @ affine_matrix(trg_tf))
    inv = src_inverse if src_inverse is not None else src_tf.GetInverse()
    return sitk.CompositeTransform([inv, trg_tf])


def random_bspline(rng: np.random.Generator, reference: sitk.Image, spacing_mm: float = 40.0,
                   max_displacement_mm: float = 3.0) -> sitk.BSplineTransform:
    """A smooth cubic B-spline deformation on ``reference``'s domain, no folding.

    Control points are about ``spacing_mm`` apart; coefficients are uniform in
    ``± max_displacement_mm`` per axis, which keeps the Jacobian determinant positive
    (a cubic B-spline's displacement gradient is bounded by about 2·max/spacing).
    """
    mesh = [max(1, int(round(n * s / spacing_mm))) for n, s in
            zip(reference.GetSize(), reference.GetSpacing(), strict=True)]
    tx = sitk.BSplineTransformInitializer(reference, mesh, order=3)
    n = len(tx.GetParameters())
    tx.SetParameters(rng.uniform(-max_displacement_mm, max_displacement_mm, n).tolist())
    return tx


def invert_points(tx: sitk.Transform, y: np.ndarray, iterations: int = 200,
                  tol: float = 1e-6) -> np.ndarray:
    """Solve ``tx(x) = y`` for each point (fixed-point iteration; tx near the identity)."""
    out = []
    for q in np.asarray(y, dtype=float):
        x = q.copy()
        for _ in range(iterations):
            r = np.array(tx.TransformPoint(x.tolist())) - q
            x = x - r
            if np.abs(r).max() < tol:
                break
        out.append(x)
    return np.array(out).reshape(-1, 3)


def _inverse_field(tx: sitk.Transform, reference: sitk.Image) -> sitk.Transform:
    """The inverse of a deformation as a displacement field on ``reference``'s grid."""
    field = sitk.TransformToDisplacementField(
        tx, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(),
        reference.GetSpacing(), reference.GetDirection())
    inv = sitk.InvertDisplacementField(field, maximumNumberOfIterations=50,
                                       maxErrorToleranceThreshold=0.01,
                                       meanErrorToleranceThreshold=0.0001)
    return sitk.DisplacementFieldTransform(inv)


# ------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Storage:
    """How one image is stored: orientation code, tilt, spacing and size per voxel axis."""

    orientation: str
    oblique_deg: float
    direction: np.ndarray  # 3x3, columns = voxel axes in LPS
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]
    origin: np.ndarray

    def reference(self) -> sitk.Image:
        img = sitk.Image([int(s) for s in self.size], sitk.sitkUInt8)
        img.SetSpacing([float(s) for s in self.spacing])
        img.SetDirection(self.direction.ravel().tolist())
        img.SetOrigin(self.origin.tolist())
        return img


def storage_grid(orientation: str, spacing: Sequence[float], centre: np.ndarray,
                 tilt: np.ndarray | None = None, fov_mm: Sequence[float] = FOV_MM) -> Storage:
    """The grid of an image with that orientation code, spacing per voxel axis and centre.

    ``tilt`` (a rotation) makes the directions oblique: ``direction = tilt · D(code)``.
    Voxel axis ``k`` covers ``|D(code)_k| · fov`` mm: the FOV along the physical axis it
    follows (the tilt turns the box with it).
    """
    d = _direction(orientation)
    # Each axis covers the FOV along the physical axis it (nearly) follows; a tilt turns
    # the box, as an oblique acquisition does, without growing it.
    extent = np.abs(d).T @ np.asarray(fov_mm, dtype=float)
    angle = 0.0
    if tilt is not None:
        d = tilt @ d
        angle = float(np.degrees(np.arccos(np.clip((np.trace(tilt) - 1) / 2, -1, 1))))
    spacing = np.asarray(spacing, dtype=float)
    size = np.maximum(np.rint(extent / spacing), 1).astype(int)
    origin = np.asarray(centre, dtype=float) - d @ (spacing * (size - 1) / 2.0)
    return Storage(orientation, angle, d, tuple(spacing.tolist()), tuple(size.tolist()), origin)


def _random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = np.radians(rng.uniform(0.0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _physical_grid(ref: sitk.Image) -> np.ndarray:
    """Physical points of every voxel, shape (z, y, x, 3) in numpy order, (x, y, z) last."""
    size = ref.GetSize()
    kk, jj, ii = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in size[::-1]),
                             indexing="ij")
    idx = np.stack([ii, jj, kk], axis=-1)
    d = np.array(ref.GetDirection(), dtype=np.float32).reshape(3, 3)
    return (np.array(ref.GetOrigin(), dtype=np.float32)
            + (idx * np.array(ref.GetSpacing(), dtype=np.float32)) @ d.T)


@dataclass(frozen=True)
class Rendered:
    image: sitk.Image  # int16
    seg: sitk.Image  # float32, P_GM + 2 P_WM
    labels: sitk.Image  # uint8
    points: np.ndarray  # (n, 3) physical


def render(tpl: Template, transform: sitk.Transform, ref: sitk.Image, rng: np.random.Generator,
           centre: np.ndarray) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """Image (int16, with the nuisances), structure map and label map on ``ref``'s grid.

    ``transform`` maps image points to template points (``T_n``).
    """
    def warp(img: sitk.Image) -> np.ndarray:
        out = sitk.Resample(img, ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out)

    t1, gm, wm = warp(tpl.t1), warp(tpl.gm), warp(tpl.wm)
    u = (_physical_grid(ref) - np.asarray(centre, dtype=np.float32)) / 100.0
    terms = [u[..., 0], u[..., 1], u[..., 2], u[..., 0] * u[..., 1], u[..., 0] * u[..., 2],
             u[..., 1] * u[..., 2], u[..., 0] ** 2, u[..., 1] ** 2, u[..., 2] ** 2]
    coef = rng.uniform(-0.25, 0.25, len(terms))
    bias = np.exp(sum(c * t for c, t in zip(coef, terms, strict=True)))
    gamma = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    scale = float(rng.uniform(300.0, 3000.0))
    sigma = float(rng.uniform(0.01, 0.04)) * scale
    clean = scale * bias * np.clip(t1 / 255.0, 0.0, None) ** gamma
    # Rician: the magnitude of a complex signal with Gaussian noise in both channels.
    noisy = np.hypot(clean + rng.normal(0.0, sigma, clean.shape),
                     rng.normal(0.0, sigma, clean.shape))
    arr = np.clip(np.rint(noisy), 0, np.iinfo(np.int16).max).astype(np.int16)
    tissue = gm + wm >= TISSUE_THRESHOLD
    labels = np.where(tissue, np.where(wm > gm, 2, 1), 0).astype(np.uint8)
    seg = (gm + 2.0 * wm).astype(np.float32)

    def wrap(a: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(a)
        img.CopyInformation(ref)
        return img

    return wrap(arr), wrap(seg), wrap(labels)


def derangement(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random permutation of 0..n-1 with no fixed point (n >= 2)."""
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


# -------------------------------------------------------------------------------- files


def points_csv(points: np.ndarray) -> str:
    """CSV text with header ``x,y,z`` (physical mm, LPS)."""
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["x", "y", "z"])
    w.writerows([[f"{v:.6f}" for v in p] for p in np.asarray(points)])
    return buf.getvalue()


def read_points_csv(path: str | Path) -> np.ndarray:
    """Points (n, 3) from a CSV with header ``x,y,z``."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]][:3] != ["x", "y", "z"]:
        raise IstnError(f"points CSV '{path}' must start with the header 'x,y,z'")
    return np.array([[float(v) for v in r[:3]] for r in rows[1:] if r], dtype=float
                    ).reshape(-1, 3)


def _pair_csv(rows: list[tuple[str, str]]) -> str:
    return "src,trg\n" + "".join(f"{s},{t}\n" for s, t in rows)


def _check(n_train: int, n_test: int, spacing: float, n_landmarks: int) -> None:
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n == 1:
            raise IstnError(f"{name} must be 0 or an integer >= 2 (pairs are formed within a "
                            f"split), got {n!r}")
    if n_train + n_test == 0:
        raise IstnError("nothing to generate: n_train and n_test are both 0")
    if not spacing > 0:
        raise IstnError(f"spacing must be > 0 mm, got {spacing!r}")
    if n_landmarks < 1:
        raise IstnError(f"n_landmarks must be >= 1, got {n_landmarks!r}")


def generate_brain(out: str | Path, n_train: int = 40, n_test: int = 10, seed: int = 0,
                   spacing: float = 2.0, nonrigid: bool = False, n_landmarks: int = 20,
                   p_oblique: float = 0.3, max_oblique_deg: float = 5.0, p_thick: float = 0.3,
                   max_rotation_deg: float = 15.0, max_translation_mm: float = 10.0,
                   max_scaling: float = 0.1, max_shear: float = 0.05,
                   bspline_mm: float = 40.0, bspline_max_mm: float = 3.0,
                   config_size: Sequence[int] = (64, 76, 64), config_spacing: float = 3.0,
                   template: Template | None = None) -> Path:
    """Write the brain set (see the module docstring) into ``out`` and return it.

    ``n_train``/``n_test`` are images per split and also pairs per split.  Files per
    image in ``<split>/``: ``brain_NNN.nii.gz`` (int16), ``_seg.nii.gz``,
    ``_labels.nii.gz``, ``_points.csv``, ``_transform.tfm`` (``.h5`` and
    ``_inverse.h5`` when nonrigid).  Index files (header ``src,trg``, paths relative to
    ``out``): ``<split>.csv``, ``.seg.csv``, ``.labels.csv``, ``.points.csv``,
    ``.transforms.csv`` for ``train``, ``test`` and ``test_reoriented``; ``pairs.csv``
    and ``pairs_reoriented.csv`` for ``istn register --pairs``
    (``src,trg,src_seg,trg_seg,src_points,trg_points``, labels as segmentations);
    ``images.json`` (each image's storage geometry and its affine ``A_n`` as a 4x4 matrix),
    ``template_points.csv`` and an istn ``config.json``.  Everything derives from
    ``seed`` (numpy ``SeedSequence``), so a rerun writes the same files.
    """
    cap = example_caps().get("pairs")  # ISTN_EXAMPLE_PAIRS: quick checks of the examples
    if cap is not None:
        n_train, n_test = min(n_train, cap), min(n_test, cap)
    _check(n_train, n_test, spacing, n_landmarks)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IstnError(f"output folder {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    # Index files go first and come back last: after a crash no CSV lists half a split.
    for name in _index_names():
        (out / name).unlink(missing_ok=True)
    tpl = template if template is not None else load_template(n_landmarks)
    centre = tpl.centre
    write_text(points_csv(tpl.landmarks), out / "template_points.csv")
    seqs = np.random.SeedSequence(int(seed)).spawn(3)
    ext = "h5" if nonrigid else "tfm"
    meta: dict[str, dict] = {}
    index: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for split, n, sseq in (("train", n_train, seqs[0]), ("test", n_test, seqs[1])):
        if n == 0:
            continue
        # One stream per image (drawn geometry does not depend on earlier images' sizes)
        # and one for the pairing.
        pair_seq, *image_seqs = sseq.spawn(1 + n)
        folder = out / split
        folder.mkdir(exist_ok=True)
        stems = []
        for k in range(n):
            rng = np.random.default_rng(image_seqs[k])
            stem = f"{split}/brain_{k:03d}"
            code = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
            tilt = _random_rotation(rng, max_oblique_deg) if rng.random() < p_oblique else None
            thick = bool(rng.random() < p_thick)
            grid = storage_grid(code, (spacing, spacing, 2 * spacing if thick else spacing),
                                centre, tilt)
            ref = grid.reference()
            a = random_affine(rng, centre, max_rotation_deg, max_translation_mm, max_scaling,
                              max_shear)
            t_img = a.GetInverse()  # image -> template
            points = np.array([a.TransformPoint(p.tolist()) for p in tpl.landmarks])
            if nonrigid:
                b = random_bspline(rng, ref, bspline_mm, bspline_max_mm)
                t_img = sitk.CompositeTransform([t_img, b])  # B first, then A⁻¹
                points = invert_points(b, points)
                write_transform(sitk.CompositeTransform([_inverse_field(b, ref), a]),
                                out / f"{stem}_inverse.h5")
            image, seg, labels = render(tpl, t_img, ref, rng, centre)
            write_image(image, out / f"{stem}.nii.gz")
            write_image(seg, out / f"{stem}_seg.nii.gz")
            write_image(labels, out / f"{stem}_labels.nii.gz")
            write_text(points_csv(points), out / f"{stem}_points.csv")
            write_transform(t_img, out / f"{stem}_transform.{ext}")
            meta[stem] = {"orientation": code, "oblique_deg": grid.oblique_deg,
                          "spacing": list(grid.spacing), "size": list(grid.size),
                          "direction": grid.direction.ravel().tolist(),
                          "thick_slices": thick, "affine": affine_matrix(a).tolist()}
            stems.append(stem)
        perm = derangement(np.random.default_rng(pair_seq), n)
        pairs = [(stems[k], stems[int(perm[k])]) for k in range(n)]
        index[split] = _index_rows(pairs, ext)
        if split == "test":
            # The same targets re-stored: DICOMOrient permutes/flips voxel axes only.
            re_rng = np.random.default_rng(seqs[2])
            folder = out / "test_reoriented"
            folder.mkdir(exist_ok=True)
            moved = {}
            for stem in sorted({t for _, t in pairs}):
                own = meta[stem]["orientation"]
                code = str(re_rng.choice([c for c in ORIENTATIONS if c != own]))
                new = "test_reoriented/" + stem.split("/")[1]
                for suffix in ("", "_seg", "_labels"):
                    img = sitk.ReadImage(str(out / f"{stem}{suffix}.nii.gz"))
                    write_image(sitk.DICOMOrient(img, code), out / f"{new}{suffix}.nii.gz")
                for suffix in ("_points.csv", f"_transform.{ext}"):
                    src_file = out / f"{stem}{suffix}"
                    write_atomic_copy(src_file, out / f"{new}{suffix}")
                if nonrigid:
                    write_atomic_copy(out / f"{stem}_inverse.h5", out / f"{new}_inverse.h5")
                ref = sitk.ReadImage(str(out / f"{new}.nii.gz"))
                meta[new] = {**meta[stem], "orientation": code, "reoriented_from": stem,
                             "spacing": list(ref.GetSpacing()), "size": list(ref.GetSize()),
                             "direction": list(ref.GetDirection())}
                moved[stem] = new
            re_pairs = [(s, moved[t]) for s, t in pairs]
            index["test_reoriented"] = _index_rows(re_pairs, ext)
    for split, rows in index.items():
        for key, suffix in (("img", "csv"), ("seg", "seg.csv"), ("labels", "labels.csv"),
                            ("points", "points.csv"), ("tf", "transforms.csv")):
            write_text(_pair_csv(rows[key]), out / f"{split}.{suffix}")
        if split.startswith("test"):
            name = "pairs.csv" if split == "test" else "pairs_reoriented.csv"
            text = "src,trg,src_seg,trg_seg,src_points,trg_points\n" + "".join(
                f"{a},{b},{c},{d},{e},{f}\n" for (a, b), (c, d), (e, f) in
                zip(rows["img"], rows["labels"], rows["points"], strict=True))
            write_text(text, out / name)
    write_text(json.dumps(meta, indent=1) + "\n", out / "images.json")
    config = {"epochs": 100, "learning_rate": 0.001, "batch_size": 2,
              "val_interval": 10, "normalizer_img": "range_matching",
              "normalizer_seg": "none", "size": [int(s) for s in config_size],
              "spacing": [float(config_spacing)] * 3, "max_translation": 0.2,
              **BRAIN_TRAINING, **BRAIN_REFINEMENT, **(BRAIN_DEFORMABLE if nonrigid else {})}
    write_text(json.dumps(config, indent=2) + "\n", out / "config.json")
    return out


# Training measured best on this set (README, "Brain MRI"): random (source, target)
# pairs of the training images each epoch, network grids centred on each image's
# centre of mass (network-only TRE 8.8 mm against 14.1 mm for the listed pairs and the
# images' geometric centres, 30 epochs), and the keypoint STN with 4 x 4 x 4 keypoints
# (network-only 2.06 and 2.29 mm in two trainings of 30 epochs; the published STN 8.8).
BRAIN_TRAINING = {"train_pairing": "random", "grid_centre": "mass", "stn_keypoints": 4}

# The refinement measured best on this set (README, "Refinement settings"): the affine
# parameters optimised on the images (no distractor here, unlike the synthetic sets) by
# Levenberg-Marquardt, the images standardised in local windows (bias field, gamma),
# 2 coarse-to-fine levels on the network grid, at 8192 sampled voxels per pair.
BRAIN_REFINEMENT = {"refine": 40, "refine_mode": "lm", "refine_inputs": "local",
                    "refine_similarity": "mse", "refine_samples": 8192, "refine_levels": 2,
                    "refine_resolution": 1, "refine_learning_rate": 0.003,
                    "refine_tolerance": 0.001}


# The nonrigid set's additions, measured best for affine+svf (README, "Nonrigid set"):
# a diffusion penalty on the velocity (training and refinement), the SVF integrated on
# every 4th network-grid voxel, and a refinement of all parameters together by Adam
# ('lm' optimises at most an affine's), in 3 levels on the network grid.
# An affine model trained on the set ignores the first two. The published STN: the
# keypoint STN is affine only.
BRAIN_DEFORMABLE = {"stn_keypoints": 0, "smoothness": 10000.0, "svf_stride": 4, "refine": 100,
                    "refine_mode": "params", "refine_levels": 3, "refine_resolution": 1}


def _index_names() -> list[str]:
    """Every index file generate_brain writes (only these are removed before a rewrite)."""
    names = [f"{split}.{suffix}" for split in ("train", "test", "test_reoriented")
             for suffix in ("csv", "seg.csv", "labels.csv", "points.csv", "transforms.csv")]
    return [*names, "pairs.csv", "pairs_reoriented.csv", "images.json", "config.json",
            "template_points.csv"]


def write_atomic_copy(src: Path, dst: Path) -> None:
    """Copy a small file atomically (text or binary)."""
    from .io import write_atomically

    data = Path(src).read_bytes()
    write_atomically(dst, lambda tmp: tmp.write_bytes(data))


def _index_rows(pairs: list[tuple[str, str]], ext: str) -> dict[str, list[tuple[str, str]]]:
    """Rows of every index CSV of a split from its (source stem, target stem) pairs."""
    both = lambda suffix: [(f"{s}{suffix}", f"{t}{suffix}") for s, t in pairs]  # noqa: E731
    return {"img": both(".nii.gz"), "seg": both("_seg.nii.gz"),
            "labels": both("_labels.nii.gz"), "points": both("_points.csv"),
            "tf": both(f"_transform.{ext}")}


# ---------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m istn.brain --out DIR [--n-train N] [--n-test N] [--seed S] ...``."""
    p = argparse.ArgumentParser(prog="python -m istn.brain", description="write the MNI152 "
                                "brain registration set with ground truth")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-train", dest="n_train", type=int, default=40,
                   help="training images = training pairs (default 40)")
    p.add_argument("--n-test", dest="n_test", type=int, default=10,
                   help="test images = test pairs (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spacing", type=float, default=2.0, help="in-plane spacing in mm")
    p.add_argument("--nonrigid", action="store_true", help="add a B-spline deformation")
    args = p.parse_args(argv)
    try:
        out = generate_brain(args.out, args.n_train, args.n_test, args.seed, args.spacing,
                             args.nonrigid)
    except IstnError as e:
        print(f"error: {e}")
        return 2
    print(f"wrote the brain set to '{out}'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Transformations in physical space: ITK transform files, displacement fields, warping.

The network predicts a sampling map ``phi`` in the normalised coordinates of its
own grids (target grid -> source grid). With ``G`` a grid's index -> physical
map and ``N`` its index -> normalised map, the physical transformation is

    T(p) = G_s(N_s^-1(phi(N_t(G_t^-1(p)))))

which maps a point of the target (fixed) image to the source (moving) image:
ITK's resampling convention, so ``sitk.Resample(source, target, T)`` warps the
source onto the target. Affine maps compose exactly into an ``AffineTransform``;
B-spline maps are written as a dense displacement field ``d(p) = T(p) - p`` on
the target's own grid (``DisplacementFieldTransform``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .data import Geometry
from .errors import IstnError
from .spatial import ALIGN_CORNERS

PointMap = Callable[[np.ndarray], np.ndarray]


def _hom(m: np.ndarray, t: np.ndarray) -> np.ndarray:
    d = len(t)
    out = np.eye(d + 1)
    out[:d, :d] = m
    out[:d, d] = t
    return out


def index_to_physical_matrix(g: Geometry) -> np.ndarray:
    """Homogeneous matrix of ``p = origin + D · diag(spacing) · i``."""
    return _hom(g.direction @ np.diag(g.spacing), g.origin)


def normalised_to_index_matrix(g: Geometry) -> np.ndarray:
    """Homogeneous matrix of ``i = (u + 1) · (n - 1) / 2`` (align_corners=True)."""
    half = (np.asarray(g.size, dtype=float) - 1) / 2.0
    return _hom(np.diag(half), half)


def affine_physical_matrix(theta: np.ndarray, g_src: Geometry, g_trg: Geometry) -> np.ndarray:
    """Physical target -> source homogeneous matrix of the normalised sampling matrix ``theta``."""
    d = theta.shape[0]
    a = _hom(theta[:, :d], theta[:, d])
    to_src = index_to_physical_matrix(g_src) @ normalised_to_index_matrix(g_src)
    from_trg = np.linalg.inv(index_to_physical_matrix(g_trg) @ normalised_to_index_matrix(g_trg))
    return to_src @ a @ from_trg


def affine_to_sitk(theta: np.ndarray, g_src: Geometry, g_trg: Geometry) -> sitk.AffineTransform:
    """The prediction as a SimpleITK ``AffineTransform`` (physical, target -> source)."""
    h = affine_physical_matrix(np.asarray(theta, dtype=float), g_src, g_trg)
    d = h.shape[0] - 1
    tx = sitk.AffineTransform(d)
    tx.SetMatrix(h[:d, :d].ravel().tolist())
    tx.SetTranslation(h[:d, d].tolist())
    return tx


def physical_point_map(model, params: torch.Tensor, g_src: Geometry, g_trg: Geometry,
                       chunk: int = 262_144, inverse: bool = False) -> PointMap:
    """``T`` as a function of physical points [N, dim] (target -> source), any model.

    ``model`` is a Model or a transformation model (``spatial.Transformation``);
    ``inverse=True``: ``T^-1`` (source -> target), through the model's inverse map.
    """
    shape = tuple(g_trg.size[::-1])
    if inverse:
        g_src, g_trg = g_trg, g_src
    from_trg = np.linalg.inv(index_to_physical_matrix(g_trg) @ normalised_to_index_matrix(g_trg))
    to_src = index_to_physical_matrix(g_src) @ normalised_to_index_matrix(g_src)
    transform = getattr(model, "transform", model)
    mapping = transform.inverse_map_points if inverse else transform.map_points
    if tuple(transform.shape) != shape:
        raise IstnError(f"the network grid {shape} does not match the model's {transform.shape}")

    def apply(points: np.ndarray) -> np.ndarray:
        pts = np.asarray(points, dtype=float)
        d = pts.shape[1]
        u = pts @ from_trg[:d, :d].T + from_trg[:d, d]
        out = np.empty_like(u)
        p = params[None].double().cpu()
        with torch.no_grad():
            for i in range(0, len(u), chunk):
                ui = torch.from_numpy(u[i:i + chunk])[None]
                out[i:i + chunk] = mapping(p, ui)[0].numpy()
        return out @ to_src[:d, :d].T + to_src[:d, d]

    return apply


@dataclass
class Exported:
    """A prediction in physical space: ``transform`` maps target points to source points.

    ``inverse`` maps source points to target points. Linear models: exact
    ``AffineTransform`` objects. Non-linear models: ``field`` / ``inverse_field`` are
    the total displacement fields (on the target's / the source's grid) and
    ``transform`` / ``inverse`` their ``DisplacementFieldTransform``s; a cascade's
    ``transform`` / ``inverse`` are ITK ``CompositeTransform``s of its stages (affine
    and a displacement field in target space), as ITK and ANTs write them.
    """

    transform: sitk.Transform
    inverse: sitk.Transform
    field: sitk.Image | None = None
    inverse_field: sitk.Image | None = None


def export_transform(model, params: torch.Tensor, g_src: Geometry, g_trg: Geometry,
                     reference: sitk.Image, source: sitk.Image | None = None,
                     fields: bool = True) -> Exported:
    """The prediction ``params`` of one pair as ITK transforms (target -> source and back).

    Linear models (``linear_matrix`` is not None) compose exactly into an
    ``AffineTransform`` (its inverse is exact too); any other model is sampled as a
    displacement field on ``reference``'s grid, its inverse (the model's own inverse
    map, see ``inverse_map_points``) on ``source``'s grid (``reference``'s if None).
    ``fields=False`` leaves a cascade's total fields out (its transforms are composites of
    the stages and do not need them).
    """
    transform = model.transform
    matrix = transform.linear_matrix(params[None])
    if matrix is not None:
        tx = affine_to_sitk(matrix[0].detach().cpu().numpy(), g_src, g_trg)
        return Exported(tx, tx.GetInverse())
    if transform.stages:
        forward, inverse = _cascade_composites(transform, params, g_src, g_trg, reference)
        if not fields:
            return Exported(forward, inverse)
    field = displacement_field(physical_point_map(transform, params, g_src, g_trg), reference)
    back = displacement_field(physical_point_map(transform, params, g_src, g_trg, inverse=True),
                              source if source is not None else reference)
    if transform.stages:
        return Exported(forward, inverse, field, back)
    return Exported(field_transform(field), field_transform(back), field, back)


def _cascade_composites(cascade, params: torch.Tensor, g_src: Geometry, g_trg: Geometry,
                        reference: sitk.Image) -> tuple[sitk.Transform, sitk.Transform]:
    """``A o D`` and ``D^-1 o A^-1`` as ITK composites of an affine-first cascade.

    ``D`` (the deformable stage, target space to target space) is a displacement field
    on the target's grid, ``A`` the affine stage in physical coordinates. ITK applies
    the last transform added to a composite first.
    """
    theta, deform = cascade.split(params[None])
    a = affine_to_sitk(theta[0].detach().cpu().numpy(), g_src, g_trg)
    stage = cascade.stages[1]
    pts = grid_points(reference)  # both fields live on the target's grid
    d = displacement_field(physical_point_map(stage, deform[0], g_trg, g_trg), reference, pts)
    d_inv = displacement_field(physical_point_map(stage, deform[0], g_trg, g_trg, inverse=True),
                               reference, pts)
    forward = sitk.CompositeTransform([a, field_transform(d)])
    inverse = sitk.CompositeTransform([field_transform(d_inv), a.GetInverse()])
    return forward, inverse


def grid_points(reference: sitk.Image) -> np.ndarray:
    """Physical points of every voxel of ``reference`` [N, dim], in array (z, y, x) order."""
    g = Geometry.of(reference)
    axes = [np.arange(n, dtype=float) for n in g.size[::-1]]
    mesh = np.meshgrid(*axes, indexing="ij")
    idx = np.stack([m.ravel() for m in mesh[::-1]], axis=1)  # (x, y, z) columns
    return g.to_physical(idx)


def displacement_field(point_map: PointMap, reference: sitk.Image,
                       points: np.ndarray | None = None) -> sitk.Image:
    """Dense displacement ``T(p) - p`` on ``reference``'s grid (vector float64 image);
    ``points``: that grid's :func:`grid_points`, when already computed."""
    pts = grid_points(reference) if points is None else points
    disp = point_map(pts) - pts
    arr = disp.reshape(*reference.GetSize()[::-1], reference.GetDimension())
    field = sitk.GetImageFromArray(arr.astype(np.float64), isVector=True)
    field.CopyInformation(reference)
    return field


def field_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """A ``DisplacementFieldTransform`` from a vector image (the image is not modified)."""
    f = sitk.Cast(field, sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(f)


def jacobian_determinant(field: sitk.Image) -> np.ndarray:
    """det(I + dd/dp) of ``p -> p + d(p)`` per voxel, in physical coordinates.

    Central differences along the grid axes, mapped to physical derivatives with the
    grid's direction and spacing (ITK's DisplacementFieldJacobianDeterminant ignores
    the direction, which is wrong for oblique images).
    """
    d = field.GetDimension()
    disp = sitk.GetArrayFromImage(field).astype(np.float64)  # [*spatial(z,y,x), d]
    # derivative of each displacement component along index axes x, y[, z]
    grads = np.gradient(disp, axis=tuple(range(d)))  # array axes (z, y, x)
    di = np.stack(grads[::-1], axis=-1)  # [..., component, index axis (x, y, z)]
    g = Geometry.of(field)
    to_index = np.linalg.inv(g.direction @ np.diag(g.spacing))  # d index / d physical
    jac = np.eye(d) + di @ to_index
    return np.linalg.det(jac)


def jacobian_stats(field: sitk.Image) -> dict[str, float]:
    """Jacobian determinant statistics of ``x -> x + d(x)``, in physical units.

    ``jacobian_min``; ``jacobian_folding_percent``: % of voxels with det <= 0;
    ``jacobian_log_std``: standard deviation of log(det) over the voxels with det > 0.
    """
    det = jacobian_determinant(field)
    positive = det[det > 0]
    return {"jacobian_min": float(det.min()),
            "jacobian_folding_percent": float(100.0 * (det <= 0).mean()),
            "jacobian_log_std": float(np.log(positive).std()) if positive.size else None}


def read_transform(path: str | Path) -> sitk.Transform:
    """An ITK transform file (.tfm, .txt, .h5) or a displacement-field image (.nii.gz, …)."""
    p = Path(path)
    if not p.is_file():
        raise IstnError(f"transform '{p}' does not exist or is not a file")
    if p.name.endswith((".tfm", ".txt", ".h5", ".hdf5", ".mat")):
        try:
            return sitk.ReadTransform(str(p))
        except RuntimeError:
            raise IstnError(f"transform '{p}' is not a readable ITK transform file") from None
    try:
        field = sitk.ReadImage(str(p))
    except RuntimeError:
        raise IstnError(f"transform '{p}' is neither an ITK transform file nor a "
                        "displacement-field image") from None
    if field.GetNumberOfComponentsPerPixel() != field.GetDimension():
        raise IstnError(f"transform '{p}' is an image but not a displacement field "
                        f"({field.GetNumberOfComponentsPerPixel()} components per voxel, "
                        f"need {field.GetDimension()})")
    return field_transform(field)


def warp_to_reference(image: sitk.Image, reference: sitk.Image, point_map: PointMap,
                      labels: bool = False) -> np.ndarray:
    """Resample ``image`` onto ``reference``'s grid through ``point_map`` with PyTorch.

    Linear interpolation (or nearest neighbour for label maps, which keeps label
    values), zero outside the image; independent of ITK's resampler, so the two
    can check each other.
    """
    g = Geometry.of(image)
    idx = g.to_index(point_map(grid_points(reference)))  # (x, y, z) continuous indices
    n = np.asarray(g.size, dtype=float)
    u = 2.0 * idx / (n - 1) - 1.0
    grid = torch.from_numpy(u).reshape(1, *reference.GetSize()[::-1], len(n))
    src = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float64))[None, None]
    out = F.grid_sample(src, grid, mode="nearest" if labels else "bilinear",
                        padding_mode="zeros", align_corners=ALIGN_CORNERS)
    return out[0, 0].numpy()

"""Registration of new pairs with a trained model, in the images' own physical geometry.

For every pair: preprocess as the model's config says, predict, refine, then
write the warped source on the target's own grid (not the network grid), the
transformation in physical coordinates (``transform.tfm`` for affine,
``displacement.nii.gz`` for B-spline), ``metrics.json`` when segmentations or
points are given, and ``report.png``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm.auto import tqdm

from .. import layout, report
from ..data import Geometry, load_pair_lists, read_points
from ..errors import IstnError
from ..export import export_transform, jacobian_stats, physical_point_map, warp_to_reference
from ..io import array_to_image, as_image, replace_folder, write_image, write_text, write_transform
from ..metrics import overlap_metrics
from .evaluate import predict, refinement_images
from .model import Model
from .refine import RefineSettings, refine

FILES = layout.REGISTER_FILES  # the output file names of one pair


def read_labels(path: Path | sitk.Image | np.ndarray, what: str,
                threshold: float | None = None) -> sitk.Image:
    """A label map as int32 (no normalisation, no resampling), from a file or in memory.

    With ``threshold`` a soft structure map (e.g. a blurred SoI) becomes label 1 where
    its value exceeds the threshold.
    """
    img = as_image(path, what)  # checks existence, readability, finiteness
    arr = sitk.GetArrayFromImage(img)
    if threshold is not None:
        arr = (arr > threshold).astype(np.int32)
    elif not np.allclose(arr, np.round(arr)):
        name = f"{what} '{path}'" if isinstance(path, str | Path) else what
        raise IstnError(f"{name} is not a label map (non-integer values); "
                        "give integer labels or --seg-threshold")
    out = sitk.GetImageFromArray(np.round(arr).astype(np.int32))
    out.CopyInformation(img)
    return out


def label_metrics(warped: np.ndarray, target: np.ndarray, spacing) -> dict[str, dict]:
    """Overlap metrics per label value present in either map (background 0 excluded)."""
    labels = sorted((set(np.unique(warped).tolist()) | set(np.unique(target).tolist())) - {0})
    out = {}
    for lab in labels:
        m = overlap_metrics((warped == lab).astype(np.float32), (target == lab).astype(np.float32),
                            spacing)
        out[str(int(lab))] = {k: (None if math.isnan(v) else v) for k, v in m.items()}
    return out


@dataclass
class PairInputs:
    """A pair's files read at their own resolution and checked, before anything is written."""

    src: sitk.Image
    trg: sitk.Image
    src_seg: sitk.Image | None = None
    trg_seg: np.ndarray | None = None
    src_points: np.ndarray | None = None
    trg_points: np.ndarray | None = None


def _name(x, what: str) -> str:
    return f"{what} '{x}'" if isinstance(x, str | Path) else what


def read_inputs(pair: tuple, seg: tuple, pts: tuple, seg_threshold: float | None) -> PairInputs:
    """Read and validate one pair's images, segmentations and points.

    Images and segmentations are files, ``sitk.Image`` objects or numpy arrays (see
    :func:`istn.io.as_image`); points are CSV files or arrays [N, dim] (physical).
    """
    src, trg = as_image(pair[0], "source image"), as_image(pair[1], "target image")
    if src.GetDimension() != trg.GetDimension():
        raise IstnError(f"{_name(pair[0], 'source')} is {src.GetDimension()}D but "
                        f"{_name(pair[1], 'target')} is {trg.GetDimension()}D; register "
                        "images of one dimension")
    inp = PairInputs(src, trg)
    for key, path, ref, what in ((0, seg[0], src, "source"), (1, seg[1], trg, "target")):
        if path is None:
            continue
        lab = read_labels(path, f"{what} segmentation", seg_threshold)
        if lab.GetSize() != ref.GetSize():
            raise IstnError(f"{_name(path, what + ' segmentation')} has size {lab.GetSize()} "
                            f"but the {what} image has size {ref.GetSize()}; they must match")
        if isinstance(path, np.ndarray):
            lab.CopyInformation(ref)  # an array takes its image's geometry
        if key == 0:
            inp.src_seg = lab
        else:
            inp.trg_seg = sitk.GetArrayFromImage(lab)
    if (pts[0] is None) != (pts[1] is None):
        raise IstnError("landmark error needs both --source-points and --target-points")
    if pts[0] is not None:
        dim = trg.GetDimension()
        inp.src_points, inp.trg_points = (_points(pts[0], dim, "source"),
                                          _points(pts[1], dim, "target"))
        if len(inp.src_points) != len(inp.trg_points):
            raise IstnError(f"points CSVs '{pts[0]}' and '{pts[1]}' list different numbers "
                            "of points; rows must correspond")
    return inp


def _points(x, dim: int, what: str) -> np.ndarray:
    """Physical points [N, dim] from a CSV file or an array."""
    if isinstance(x, str | Path):
        return read_points(Path(x), dim)
    pts = np.asarray(x, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != dim or not np.isfinite(pts).all():
        raise IstnError(f"{what} points must be an array [N, {dim}] of finite physical "
                        f"coordinates, got shape {pts.shape}")
    return pts


@dataclass
class Registration:
    """One registered pair in the images' own physical geometry (nothing written yet).

    ``transform`` maps target points to source points (what ``sitk.Resample(source,
    target, transform)`` expects) and ``inverse`` source points to target points;
    ``warped`` is the source on the target's own grid (linear), ``warped_seg`` the source
    label map there (nearest neighbour); ``field``/``inverse_field`` the displacement
    fields of non-linear models; ``metrics`` per label (``labels``), landmark errors and
    Jacobian statistics where the inputs allow; ``params`` the network-grid parameters.
    ``warped`` and ``warped_seg`` are None (and ``metrics`` has no ``labels`` and no
    Jacobian statistics; a cascade has no ``field``/``inverse_field``) when the pair was
    registered with ``warp=False`` (transforms only).
    """

    warped: sitk.Image | None
    transform: sitk.Transform
    inverse: sitk.Transform
    metrics: dict
    params: torch.Tensor
    field: sitk.Image | None = None
    inverse_field: sitk.Image | None = None
    warped_seg: sitk.Image | None = None
    refined: bool = False  # test-time refinement ran (else: the network's prediction)


def register_inputs(model: Model, inputs: list[PairInputs], device: torch.device,
                    refine_iters: int, progress: bool = True, warp: bool = True
                    ) -> list[Registration]:
    """Register checked in-memory pairs (networks and refinement batched over pairs);
    ``warp=False`` stops at the transforms (no warped images, no label metrics)."""
    ps = load_pair_lists(model.cfg, [(inp.src, inp.trg) for inp in inputs])
    src, trg = ps.src.to(device), ps.trg.to(device)
    params, s_p, t_p = predict(model, src, trg)
    if refine_iters > 0:
        params = refine(model, s_p, t_p, RefineSettings.from_config(model.cfg, refine_iters),
                        progress, images=refinement_images(model, ps, device), start=params)
    params = params.detach().cpu()
    regs = [_registration(model, params[i], ps.src_grid[i], ps.trg_grid[i], inputs[i], warp)
            for i in range(len(inputs))]
    for reg in regs:
        reg.refined = refine_iters > 0
    return regs


def _registration(model: Model, params: torch.Tensor, g_src: Geometry, g_trg: Geometry,
                  inp: PairInputs, warp: bool = True) -> Registration:
    src, trg = inp.src, inp.trg
    point_map = physical_point_map(model, params, g_src, g_trg)
    metrics: dict = {"transformation": model.transformation}
    warped = array_to_image(warp_to_reference(src, trg, point_map), trg) if warp else None
    exported = export_transform(model, params, g_src, g_trg, trg, src, fields=warp)
    if warp and exported.field is not None:
        metrics.update(jacobian_stats(exported.field))
    reg = Registration(warped, exported.transform, exported.inverse, metrics, params,
                       exported.field, exported.inverse_field)
    if warp and inp.src_seg is not None:
        labels = warp_to_reference(inp.src_seg, trg, point_map, labels=True).astype(np.int32)
        reg.warped_seg = sitk.GetImageFromArray(labels)
        reg.warped_seg.CopyInformation(trg)
        if inp.trg_seg is not None:
            metrics["labels"] = label_metrics(labels, inp.trg_seg, trg.GetSpacing())
    if inp.src_points is not None:
        mapped = point_map(inp.trg_points)
        metrics["landmark_error"] = float(np.linalg.norm(mapped - inp.src_points, axis=1).mean())
        metrics["landmark_error_identity"] = float(
            np.linalg.norm(inp.trg_points - inp.src_points, axis=1).mean())
    return reg


def register_pairs(model: Model, pairs: list[tuple[Path, Path]], out_dirs: list[Path],
                   device: torch.device, refine_iters: int,
                   segs: list[tuple[Path | None, Path | None]] | None = None,
                   points: list[tuple[Path | None, Path | None]] | None = None,
                   seg_threshold: float | None = None, progress: bool = True) -> list[dict]:
    """Register every pair (networks and refinement batched over pairs); write outputs.

    Every input is read (once) and checked before the first output is written.
    """
    inputs = [read_inputs(pairs[i], segs[i] if segs else (None, None),
                          points[i] if points else (None, None), seg_threshold)
              for i in range(len(pairs))]
    regs = register_inputs(model, inputs, device, refine_iters, progress)
    results = []
    for i in tqdm(range(len(pairs)), desc="write", disable=not progress or len(pairs) == 1):
        regs[i].metrics = {"source": str(pairs[i][0]), "target": str(pairs[i][1]),
                           **regs[i].metrics}
        # the pair's whole set of files replaces an earlier run's (no stale files beside it)
        replace_folder(out_dirs[i], partial(write_registration, regs[i], inputs[i]),
                       FILES.values())
        results.append(regs[i].metrics)
    return results


def _composite(tx: sitk.Transform) -> sitk.CompositeTransform:
    """``tx`` as an ITK CompositeTransform (what ``.h5`` transform files hold)."""
    if isinstance(tx, sitk.CompositeTransform):
        return tx
    return sitk.CompositeTransform([tx])


def write_registration(reg: Registration, inp: PairInputs, out: Path) -> None:
    """The files of one registered pair in ``out`` (names from :mod:`istn.layout`)."""
    out.mkdir(parents=True, exist_ok=True)
    src, trg = inp.src, inp.trg
    write_image(reg.warped, out / FILES["warped"])
    if reg.field is None:
        write_transform(reg.transform, out / FILES["affine"])
    else:
        write_image(reg.field, out / FILES["field"])
    # every model: one ITK file each way (composite for cascades), read by SimpleITK / ANTs
    write_transform(_composite(reg.transform), out / FILES["composite"])
    write_transform(_composite(reg.inverse), out / FILES["inverse"])
    if reg.warped_seg is not None:
        write_image(reg.warped_seg, out / FILES["warped_seg"])
    write_text(json.dumps(reg.metrics, indent=2) + "\n", out / FILES["metrics"])
    before = sitk.GetArrayFromImage(sitk.Resample(src, trg))  # identity, physical space
    src_seg_before = (sitk.GetArrayFromImage(sitk.Resample(inp.src_seg, trg, sitk.Transform(),
                                                           sitk.sitkNearestNeighbor))
                      if inp.src_seg is not None else None)
    warped_seg = sitk.GetArrayFromImage(reg.warped_seg) if reg.warped_seg is not None else None
    m = reg.metrics
    report.registration_figure(before, sitk.GetArrayFromImage(trg),
                               sitk.GetArrayFromImage(reg.warped), inp.trg_seg,
                               src_seg_before, warped_seg, out / FILES["report"],
                               spacing=trg.GetSpacing(), direction=trg.GetDirection(),
                               tre=(m.get("landmark_error_identity"), m.get("landmark_error")),
                               stage="refined" if reg.refined else "predicted")

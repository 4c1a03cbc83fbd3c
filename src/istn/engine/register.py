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
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm.auto import tqdm

from .. import report
from ..data import Geometry, load_pair_lists, read_points
from ..errors import IstnError
from ..export import (
    affine_to_sitk,
    displacement_field,
    jacobian_stats,
    physical_point_map,
    warp_to_reference,
)
from ..io import array_to_image, read_image, write_image, write_text, write_transform
from ..metrics import overlap_metrics
from .evaluate import predict, refine
from .model import Model

FILES = {"warped": "warped_source.nii.gz", "warped_seg": "warped_source_seg.nii.gz",
         "affine": "transform.tfm", "field": "displacement.nii.gz",
         "metrics": "metrics.json", "report": "report.png"}


def read_labels(path: Path, what: str, threshold: float | None = None) -> sitk.Image:
    """A label map as int32 (no normalisation, no resampling).

    With ``threshold`` a soft structure map (e.g. a blurred SoI) becomes label 1 where
    its value exceeds the threshold.
    """
    img = read_image(path, what)  # checks existence, readability, finiteness
    arr = sitk.GetArrayFromImage(img)
    if threshold is not None:
        arr = (arr > threshold).astype(np.int32)
    elif not np.allclose(arr, np.round(arr)):
        raise IstnError(f"{what} '{path}' is not a label map (non-integer values); "
                        "give integer labels or --seg-threshold")
    out = sitk.GetImageFromArray(np.round(arr).astype(np.int32))
    out.CopyInformation(img)
    return out


def label_metrics(warped: np.ndarray, target: np.ndarray, spacing) -> dict[str, dict]:
    """Overlap metrics per label value present in either map (background 0 excluded)."""
    labels = sorted(set(np.unique(warped).tolist()) | set(np.unique(target).tolist()) - {0})
    out = {}
    for lab in labels:
        if lab == 0:
            continue
        m = overlap_metrics((warped == lab).astype(np.float32), (target == lab).astype(np.float32),
                            spacing)
        out[str(int(lab))] = {k: (None if math.isnan(v) else v) for k, v in m.items()}
    return out


def register_pairs(model: Model, pairs: list[tuple[Path, Path]], out_dirs: list[Path],
                   device: torch.device, refine_iters: int,
                   segs: list[tuple[Path | None, Path | None]] | None = None,
                   points: list[tuple[Path | None, Path | None]] | None = None,
                   seg_threshold: float | None = None, progress: bool = True) -> list[dict]:
    """Register every pair (networks and refinement batched over pairs); write outputs."""
    ps = load_pair_lists(model.cfg, pairs)
    params, s_p, t_p = predict(model, ps.src.to(device), ps.trg.to(device))
    if refine_iters > 0:
        cfg = model.cfg
        params = refine(model, s_p, t_p, refine_iters, cfg.refine_learning_rate or
                        cfg.learning_rate, cfg.refine_mode, cfg.refine_batch, progress)
    params = params.detach().cpu()
    results = []
    for i in tqdm(range(len(pairs)), desc="write", disable=not progress or len(pairs) == 1):
        seg = segs[i] if segs else (None, None)
        pts = points[i] if points else (None, None)
        results.append(_write_pair(model, params[i], ps.src_grid[i], ps.trg_grid[i], pairs[i],
                                   seg, pts, out_dirs[i], seg_threshold))
    return results


def _write_pair(model: Model, params: torch.Tensor, g_src: Geometry, g_trg: Geometry,
                pair: tuple[Path, Path], seg: tuple, pts: tuple, out: Path,
                seg_threshold: float | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    src, trg = read_image(pair[0], "source image"), read_image(pair[1], "target image")
    point_map = physical_point_map(model, params, g_src, g_trg)
    metrics: dict = {"source": str(pair[0]), "target": str(pair[1]),
                     "transformation": model.transformation}
    warped = warp_to_reference(src, trg, point_map)
    write_image(array_to_image(warped, trg), out / FILES["warped"])
    if model.transformation == "affine":
        write_transform(affine_to_sitk(params.numpy(), g_src, g_trg), out / FILES["affine"])
    else:
        field = displacement_field(point_map, trg)
        write_image(field, out / FILES["field"])
        metrics.update(jacobian_stats(field))
    warped_seg = src_seg = trg_seg = None
    if seg[0] is not None:
        src_seg = read_labels(seg[0], "source segmentation", seg_threshold)
        warped_seg = warp_to_reference(src_seg, trg, point_map, labels=True).astype(np.int32)
        seg_img = sitk.GetImageFromArray(warped_seg)
        seg_img.CopyInformation(trg)
        write_image(seg_img, out / FILES["warped_seg"])
    if seg[1] is not None:
        trg_seg = sitk.GetArrayFromImage(read_labels(seg[1], "target segmentation",
                                                     seg_threshold))
        if trg_seg.shape != sitk.GetArrayFromImage(trg).shape:
            raise IstnError(f"target segmentation '{seg[1]}' does not match the target's size")
        if warped_seg is not None:
            metrics["labels"] = label_metrics(warped_seg, trg_seg, trg.GetSpacing())
    if pts[0] is not None and pts[1] is not None:
        dim = trg.GetDimension()
        ps_, pt_ = read_points(pts[0], dim), read_points(pts[1], dim)
        if len(ps_) != len(pt_):
            raise IstnError(f"points CSVs '{pts[0]}' and '{pts[1]}' list different numbers "
                            "of points; rows must correspond")
        mapped = point_map(pt_)
        metrics["landmark_error"] = float(np.linalg.norm(mapped - ps_, axis=1).mean())
        metrics["landmark_error_identity"] = float(np.linalg.norm(pt_ - ps_, axis=1).mean())
    write_text(json.dumps(metrics, indent=2) + "\n", out / FILES["metrics"])
    before = sitk.GetArrayFromImage(sitk.Resample(src, trg))  # identity, physical space
    src_seg_before = (sitk.GetArrayFromImage(sitk.Resample(src_seg, trg, sitk.Transform(),
                                                           sitk.sitkNearestNeighbor))
                      if src_seg is not None else None)
    report.registration_figure(before, sitk.GetArrayFromImage(trg), warped, trg_seg,
                               src_seg_before, warped_seg, out / FILES["report"])
    return metrics

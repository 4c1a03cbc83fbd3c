"""Prediction and evaluation of pairs: identity, before and after test-time refinement.

:func:`evaluate` returns an :class:`Evaluation` (typed, one field per stage);
refinement itself is :mod:`.refine`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import PairSet, load_finer
from ..metrics import label_overlap_metrics, landmark_centroids, landmark_error
from ..spatial import index_to_normalised, normalised_to_index, warp
from .model import Model
from .refine import RefineSettings, refine

MetricRows = list[dict[str, float | None]]
STAGES = ("identity", "before_refinement", "after_refinement")


@torch.no_grad()
def predict(model: Model, src: torch.Tensor, trg: torch.Tensor, batch_size: int = 16
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(params, S', T') for all pairs, in batches, without gradients."""
    model.train(False)
    out_p, out_s, out_t = [], [], []
    for i in range(0, len(src), batch_size):
        s_p, t_p = model.primes(src[i:i + batch_size], trg[i:i + batch_size])
        out_p.append(model.params(s_p, t_p))
        out_s.append(s_p)
        out_t.append(t_p)
    return torch.cat(out_p), torch.cat(out_s), torch.cat(out_t)


@dataclass
class Warped:
    """Warped source images of all pairs for one set of parameters."""

    params: torch.Tensor
    src: torch.Tensor
    seg: torch.Tensor | None
    src_prime: torch.Tensor | None


@torch.no_grad()
def apply(model: Model, params: torch.Tensor, ps: PairSet, src_prime: torch.Tensor | None,
          batch_size: int = 16) -> Warped:
    """Warp source, source SoI and S' of every pair with ``params``."""
    dev = params.device
    outs: dict[str, list[torch.Tensor]] = {"src": [], "seg": [], "prime": []}
    for i in range(0, len(ps), batch_size):
        grid = model.stn.grid(params[i:i + batch_size])
        outs["src"].append(warp(ps.src[i:i + batch_size].to(dev), grid).cpu())
        if ps.src_seg is not None:
            outs["seg"].append(warp(ps.src_seg[i:i + batch_size].to(dev), grid).cpu())
        if src_prime is not None:
            outs["prime"].append(warp(src_prime[i:i + batch_size], grid).cpu())
    cat = lambda k: torch.cat(outs[k]) if outs[k] else None  # noqa: E731
    return Warped(params.cpu(), cat("src"), cat("seg"), cat("prime"))


def pair_metrics(model: Model, ps: PairSet, params: torch.Tensor | None,
                 warped_seg: torch.Tensor | None) -> list[dict[str, float | None]]:
    """Per-pair metrics; ``params=None`` evaluates the identity (no registration).

    Overlap: warped source SoI vs target SoI, binarised at 0.5, physical spacing; a SoI
    of several structures (config 'labels', 'soi_components'): per structure (``dice_1``,
    ...) and their mean (``dice``), :func:`istn.metrics.label_overlap_metrics`.
    landmark_error: centroids of the source landmark blobs mapped to the target by the
    inverse of the sampling map, matched one-to-one (Hungarian, minimum total distance)
    to the target's centroids; mean physical distance. With point CSVs (physical x,y[,z],
    rows corresponding) the listed points are used row by row, unmatched.
    landmark_error_gt: the same
    source centroids mapped by the predicted and by the ground-truth transform.
    """
    spacing = np.asarray(model.cfg.spacing, dtype=float)
    names = model.cfg.soi_names
    rows = []
    for i in range(len(ps)):
        row: dict[str, float | None] = {}
        if ps.src_seg is not None and ps.trg_seg is not None:
            pred = ps.src_seg[i] if params is None else warped_seg[i]
            row.update(label_overlap_metrics(pred.numpy(), ps.trg_seg[i].numpy(), spacing,
                                             names))
        paired = ps.src_landmarks is not None
        if ps.src_pts is not None or paired:
            src_c = (ps.src_landmarks[i] if paired
                     else landmark_centroids(ps.src_pts[i, 0].numpy()))
            mapped = src_c if params is None else map_source_points(model, params[i], src_c)
            if paired:
                row["landmark_error"] = landmark_error(mapped, ps.trg_landmarks[i], spacing,
                                                       match=False)
            elif ps.trg_pts is not None:
                trg_c = landmark_centroids(ps.trg_pts[i, 0].numpy())
                row["landmark_error"] = landmark_error(mapped, trg_c, spacing)
            if ps.transforms is not None:
                truth = true_source_to_target(ps, i, src_c)
                row["landmark_error_gt"] = landmark_error(mapped, truth, spacing, match=False)
        rows.append(row)
    return rows


def map_source_points(model: Model, params: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """Source-grid voxel indices (x, y[, z]) -> target-grid indices under ``params``."""
    if len(points) == 0:
        return points
    shape = model.cfg.shape
    p = index_to_normalised(torch.as_tensor(points, dtype=torch.float32)[None], shape)
    with torch.no_grad():
        q = model.transform.inverse_map_points(params[None].float().cpu(), p)
    return normalised_to_index(q, shape)[0].numpy()


def true_source_to_target(ps: PairSet, i: int, points: np.ndarray) -> np.ndarray:
    """Map source-grid indices to target-grid indices with the ground-truth transforms.

    Transform files map file voxel indices to the template (``image(p) = template(T p)``),
    so a source point moves to the target by ``inv(T_t) @ T_s`` in file indices.
    """
    t_s, t_t = ps.transforms[i]
    dim = points.shape[1]
    phys = ps.src_grid[i].to_physical(points)
    idx = ps.src_file[i].to_index(phys)
    hom = np.zeros((len(idx), 4))
    hom[:, :dim] = idx
    hom[:, 3] = 1.0
    moved = (np.linalg.inv(t_t) @ t_s @ hom.T).T[:, :dim]
    return ps.trg_grid[i].to_index(ps.trg_file[i].to_physical(moved))


@dataclass
class Evaluation:
    """Per-pair metric rows of every stage, the warped images and the ITN outputs.

    ``after_refinement`` and ``warped_refined`` are None when not refined;
    ``src_prime``/``trg_prime`` are None for STN-u/-s (no ITN).
    """

    identity: MetricRows
    before_refinement: MetricRows
    warped: Warped
    after_refinement: MetricRows | None = None
    warped_refined: Warped | None = None
    src_prime: torch.Tensor | None = None
    trg_prime: torch.Tensor | None = None

    def stages(self) -> dict[str, MetricRows | None]:
        """The metric rows of each stage of ``STAGES``, in that order."""
        return {stage: getattr(self, stage) for stage in STAGES}


def refinement_images(model: Model, ps: PairSet, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (source, target) images refinement compares: the network-grid images, or with
    ``refine_resolution`` k > 1 the images on their network grids made k times finer."""
    k = model.cfg.refine_resolution
    if k == 1:
        return ps.src.to(device), ps.trg.to(device)
    return (load_finer(model.cfg, ps.src_items, ps.src_grid, k).to(device),
            load_finer(model.cfg, ps.trg_items, ps.trg_grid, k).to(device))


def evaluate(model: Model, ps: PairSet, device: torch.device,
             refinement: RefineSettings | None = None, batch_size: int = 16,
             progress: bool = True) -> Evaluation:
    """Predict (and refine, when ``refinement`` has iterations) every pair; metrics per stage."""
    src, trg = ps.src.to(device), ps.trg.to(device)
    params, s_p, t_p = predict(model, src, trg, batch_size)
    itn_out = s_p if model.itn is not None else None
    before = apply(model, params, ps, itn_out, batch_size)
    result = Evaluation(
        identity=pair_metrics(model, ps, None, None),
        before_refinement=pair_metrics(model, ps, before.params, before.seg),
        warped=before,
        src_prime=s_p.cpu() if itn_out is not None else None,
        trg_prime=t_p.cpu() if itn_out is not None else None)
    if refinement is not None and refinement.iterations > 0:
        refined = refine(model, s_p, t_p, refinement, progress,
                         images=refinement_images(model, ps, device), start=params)
        after = apply(model, refined, ps, itn_out, batch_size)
        result.after_refinement = pair_metrics(model, ps, after.params, after.seg)
        result.warped_refined = after
    return result

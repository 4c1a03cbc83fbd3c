"""Pictures, the HTML cohort report and TensorBoard helpers (files only; never a window).

Picture conventions:

* contours: with one structure the target's is lime and the moving image's magenta; with
  several labels (label maps with values 1, 2, ...) each label has its own colour, the
  target's contour solid and the moving image's dashed; a legend says which is which;
* pixels are drawn with the aspect ratio of the voxel spacing of the shown plane;
* 3D images are shown in three orthogonal planes through the centre of the target
  structure (or of the image), named axial / coronal / sagittal after the physical axis
  (ITK's LPS convention: +x Left, +y Posterior, +z Superior) nearest to each image axis
  given the image direction, in radiological orientation: patient's right on the left
  of the screen (axial, coronal), anterior at the top (axial), superior at the top
  (coronal, sagittal), anterior on the left (sagittal); letters at the edges mark the
  directions. 2D images are shown as stored (first array axis downwards), unlabelled.
"""

from __future__ import annotations

import base64
import html
import io as _io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")  # batch jobs: render to files, never to a screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from . import layout  # noqa: E402
from .io import write_atomically  # noqa: E402
from .metrics import label_key  # noqa: E402


def tensorboard_writer(folder: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


def middle_slice(vol: torch.Tensor | np.ndarray) -> np.ndarray:
    """A 2D view of a [*spatial] array: itself in 2D, the central axial slice in 3D."""
    a = np.asarray(vol.detach().cpu() if isinstance(vol, torch.Tensor) else vol, dtype=float)
    return a[a.shape[0] // 2] if a.ndim == 3 else a


def mosaic(vol: torch.Tensor) -> torch.Tensor:
    """A [*spatial] volume as one 2D image: itself in 2D, three central slices side by side."""
    if vol.dim() == 2:
        return vol
    z, y, x = vol.shape
    views = [vol[z // 2], vol[:, y // 2], vol[:, :, x // 2]]
    h = max(v.shape[0] for v in views)
    padded = [torch.nn.functional.pad(v, (0, 0, 0, h - v.shape[0])) for v in views]
    return torch.cat(padded, dim=1)


def _scale01(t: torch.Tensor) -> torch.Tensor:
    lo, hi = t.min(), t.max()
    return (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)


def panel_tensor(ps, res, i: int) -> torch.Tensor:
    """Source | target | warped source (| S' | T') for TensorBoard, values in [0, 1].

    ``res`` is an :class:`istn.engine.evaluate.Evaluation`.
    """
    tiles = [ps.src[i, 0], ps.trg[i, 0], res.warped.src[i, 0]]
    if res.src_prime is not None:
        tiles += [torch.as_tensor(_composite(t[i])) for t in (res.src_prime, res.trg_prime)]
    return torch.cat([_scale01(mosaic(t.float().cpu())) for t in tiles], dim=1)


# ----------------------------------------------------------------------------- saving


def _png(fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = _io.BytesIO()
    try:
        fig.savefig(buf, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


def _save(fig, path: Path) -> None:
    data = _png(fig)
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def loss_curve(history: list[dict], path: Path, title: str | None = None) -> None:
    """Training (and validation) loss per epoch as a PNG.

    The loss is the training strategy's objective (a sum of similarity terms on normalised
    intensities): it has no physical unit. The y axis is logarithmic when every value is
    positive.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    ep = [h["epoch"] for h in history]
    train = [h["train_loss"] for h in history]
    ax.plot(ep, train, label="train")
    val = [(h["epoch"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    values = train + [v for _, v in val]
    log = bool(values) and all(v is not None and v > 0 for v in values)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (no unit" + (", log scale)" if log else ")"))
    if log:
        ax.set_yscale("log")
    ax.set_title(title or "Training loss per epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


# ------------------------------------------------------------------------ orientation


@dataclass(frozen=True)
class Plane:
    """How one 2D view is drawn: its name, pixel aspect (height / width) and edge letters."""

    name: str
    aspect: float
    markers: tuple[str, str, str, str] | None  # top, bottom, left, right


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
    return np.asarray(a, dtype=float)


def to_lps(vol: np.ndarray, spacing: Sequence[float] | None = None,
           direction: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A 3D array ([z, y, x]) permuted and flipped so its axes run along +S, +P, +L.

    Each physical axis (LPS: +x Left, +y Posterior, +z Superior) gets the image axis
    whose direction cosine with it is largest in magnitude (one-to-one; an oblique image
    is shown along its nearest axes, not resampled). Returns the array (axes S, P, L)
    and its spacing in (L, P, S) order. Defaults: unit spacing, identity direction.
    """
    sp = np.ones(3) if spacing is None else np.asarray(spacing, dtype=float)
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
    # d[:, k] is the physical direction of image index axis k (x, y, z)
    phys, index = linear_sum_assignment(-np.abs(d))
    of = dict(zip(phys.tolist(), index.tolist(), strict=True))
    out = np.transpose(vol, [2 - of[r] for r in (2, 1, 0)])  # array axis of index k is 2 - k
    for n, r in enumerate((2, 1, 0)):
        if d[r, of[r]] < 0:
            out = np.flip(out, axis=n)
    return out, np.array([sp[of[r]] for r in (0, 1, 2)])


def views(vol, spacing: Sequence[float] | None = None,
          direction: Sequence[float] | None = None,
          centre: Sequence[int] | None = None) -> list[tuple[Plane, np.ndarray]]:
    """The planes to draw of an image ([z, y, x] or [y, x] array, spacing (x, y[, z])).

    2D: the image as stored. 3D: axial, coronal and sagittal planes through ``centre``
    (indices in the :func:`to_lps` array; default its middle) in radiological orientation
    (see the module docstring).
    """
    a = _np(vol)
    if a.ndim == 2:
        sx, sy = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
        return [(Plane("", sy / sx, None), a)]
    v, (s_l, s_p, s_s) = to_lps(a, spacing, direction)
    cs, cp, cl = [n // 2 for n in v.shape] if centre is None else centre
    return [(Plane("axial", s_p / s_l, ("A", "P", "R", "L")), v[cs]),
            (Plane("coronal", s_s / s_l, ("S", "I", "R", "L")), v[:, cp, :][::-1]),
            (Plane("sagittal", s_s / s_p, ("S", "I", "A", "P")), v[:, :, cl][::-1])]


def _focus(labels: np.ndarray | None, spacing, direction) -> list[int] | None:
    """The centre of a label map's foreground in :func:`to_lps` indices (3D only)."""
    if labels is None or labels.ndim != 3:
        return None
    v, _ = to_lps(labels > 0, spacing, direction)
    if not v.any():
        return None
    return [int(round(float(c))) for c in np.argwhere(v).mean(axis=0)]


def _mark(ax, plane: Plane) -> None:
    """Orientation letters at the edges of a 3D plane."""
    if plane.markers is None:
        return
    kw = dict(transform=ax.transAxes, color="yellow", fontsize=7, fontweight="bold")
    top, bottom, left, right = plane.markers
    ax.text(0.5, 0.99, top, ha="center", va="top", **kw)
    ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **kw)
    ax.text(0.01, 0.5, left, ha="left", va="center", **kw)
    ax.text(0.99, 0.5, right, ha="right", va="center", **kw)


def _show(ax, plane: Plane, img: np.ndarray) -> None:
    ax.imshow(img, cmap="gray", aspect=plane.aspect, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    _mark(ax, plane)


# -------------------------------------------------------------------- label contours

SINGLE = ("lime", "magenta")  # target, moving: one structure
PALETTE = ("#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3", "#ffff33", "#a65628",
           "#f781bf", "#17becf", "#bcbd22")


def _label_map(seg, multi: bool = True) -> np.ndarray:
    """An integer label map. ``multi``: an integer-valued map keeps its labels (1, 2, ...);
    otherwise, and for any non-integer (soft, e.g. warped or blurred) map, one structure:
    label 1 where the value exceeds 0.5 (the binarisation of the metrics)."""
    a = _np(seg)
    if multi and np.allclose(a, np.round(a)):
        return np.round(a).astype(int)
    return (a > 0.5).astype(int)


def _soi_map(seg, i: int) -> np.ndarray:
    """Pair ``i``'s SoI (``seg`` [N, C, ...]) as an integer map. One channel: label 1 where
    it exceeds 0.5 (the binarisation of the metrics); several (one per structure): ``k + 1``
    where channel ``k`` is the largest and exceeds 0.5, else 0."""
    a = _np(seg[i])
    if a.shape[0] == 1:
        return _label_map(a[0], False)
    return np.where(a.max(0) > 0.5, a.argmax(0) + 1, 0)


def _composite(x) -> np.ndarray:
    """A [C, ...] representation (S', T') as one grey picture: channel ``k`` weighted by
    ``k + 1`` (one channel: itself), so several structures show as distinct grey levels."""
    a = _np(x)
    return a[0] if a.shape[0] == 1 else np.tensordot(np.arange(1, a.shape[0] + 1), a, 1)


def _channel_names(seg, names: Sequence[str] | None) -> list[str]:
    """The names of the SoI's structures (default ``1, 2, ...``)."""
    return list(names) if names is not None else [str(k + 1) for k in range(seg.shape[1])]


def _labels(*maps: np.ndarray | None) -> list[int]:
    """The label values (background 0 excluded) of integer label maps; [1] when none."""
    found: set[int] = set()
    for m in maps:
        if m is not None:
            found |= set(np.unique(m).tolist())
    return sorted(found - {0}) or [1]


def _style(labels: Sequence[int], lab: int, moving: bool) -> dict:
    if len(labels) == 1:
        return {"colors": [SINGLE[int(moving)]], "linestyles": "solid"}
    colour = PALETTE[list(labels).index(lab) % len(PALETTE)]
    return {"colors": [colour], "linestyles": "dashed" if moving else "solid"}


def _contours(ax, seg2d: np.ndarray | None, labels: Sequence[int], moving: bool) -> None:
    if seg2d is None:
        return
    for lab in labels:
        m = seg2d == lab
        if m.any() and not m.all():
            ax.contour(m, levels=[0.5], linewidths=0.9, **_style(labels, lab, moving))


def _legend(fig, labels: Sequence[int], moving: str,
            names: Sequence[str] | None = None) -> None:
    """Which contour is which, below the panels (``names[k]``: the name of label k + 1)."""
    if len(labels) == 1:
        hs = [Line2D([], [], color=SINGLE[0], label="target"),
              Line2D([], [], color=SINGLE[1], label=moving)]
    else:
        hs = [Line2D([], [], color="0.2", ls="-", label="target"),
              Line2D([], [], color="0.2", ls="--", label=moving)]
        hs += [Line2D([], [], color=_style(labels, lab, False)["colors"][0], lw=4,
                      label=f"label {names[lab - 1] if names else lab}") for lab in labels]
    fig.legend(handles=hs, loc="outside lower center", ncol=min(len(hs), 8), frameon=False,
               fontsize=8)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    n = int(a.sum()) + int(b.sum())
    return float("nan") if n == 0 else 2.0 * int(np.logical_and(a, b).sum()) / n


def _mean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there is none (no warning, unlike nanmean)."""
    ok = [v for v in values if math.isfinite(v)]
    return sum(ok) / len(ok) if ok else float("nan")


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(float(v)) else f"{float(v):.{digits}f}"


def _arrow(values: Sequence, digits: int = 3) -> str:
    return " → ".join(_fmt(v, digits) for v in values)


# ------------------------------------------------------------------------ pictures

STAGE_NAMES = {"identity": "unregistered", "before_refinement": "predicted",
               "after_refinement": "refined"}


def _geometry(ps, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(spacing, direction) of pair ``i``'s target network grid, (None, None) if unknown."""
    if len(ps.trg_grid) <= i:
        return None, None
    return ps.trg_grid[i].spacing, ps.trg_grid[i].direction


def _pair_figure(ps, res, indices: Sequence[int], names: Sequence[str] | None = None):
    """Rows of pairs (3D: three planes each): source, target, S', T', warped source, SoI."""
    refined = res.warped_refined is not None
    warped = res.warped_refined if refined else res.warped
    stage = "refined" if refined else "predicted"
    with_seg = ps.trg_seg is not None and warped.seg is not None
    cols = ["source", "target"]
    if res.src_prime is not None:
        cols += ["ITN(source)", "ITN(target)"]
    cols += [f"warped source ({stage})", "SoI on target" if with_seg else "target"]
    stages = [s for s in ("identity", "before_refinement", "after_refinement")
              if getattr(res, s) is not None]
    # istn test's SoI: one structure per channel, binarised at 0.5 as its metrics are
    channels = ps.trg_seg.shape[1] if with_seg else 1
    labels = list(range(1, channels + 1))
    soi = _channel_names(ps.trg_seg, names) if channels > 1 else None
    nplanes = 1 if ps.src.dim() == 4 else 3
    nrows = len(indices) * nplanes
    # constrained layout keeps every row's titles, the suptitle and the legend apart
    fig, axes = plt.subplots(nrows, len(cols), figsize=(2.4 * len(cols), 2.4 * nrows + 0.8),
                             squeeze=False, layout="constrained")
    for k, i in enumerate(indices):
        sp, dr = _geometry(ps, i)
        centre = _focus(_soi_map(ps.trg_seg, i), sp, dr) if with_seg else None
        imgs = [ps.src[i, 0], ps.trg[i, 0]]
        if res.src_prime is not None:
            imgs += [_composite(res.src_prime[i]), _composite(res.trg_prime[i])]
        imgs += [warped.src[i, 0], ps.trg[i, 0]]
        planes = [views(im, sp, dr, centre) for im in imgs]
        segs = ([views(_soi_map(s, i), sp, dr, centre)
                 for s in (ps.trg_seg, warped.seg)] if with_seg else None)
        for p in range(nplanes):
            r = k * nplanes + p
            for c in range(len(cols)):
                plane, img = planes[c][p]
                _show(axes[r, c], plane, img)
                if r == 0:
                    axes[r, c].set_title(cols[c], fontsize=8)
            if segs is not None:
                _contours(axes[r, -1], segs[0][p][1], labels, moving=False)
                _contours(axes[r, -1], segs[1][p][1], labels, moving=True)
            plane = planes[0][p][0]
            axes[r, 0].set_ylabel(ps.names[i] + (f"\n{plane.name}" if plane.name else ""),
                                  fontsize=7)
        # the pair's metrics over the stages, in the title of its last panel
        lines = []
        per_label = [(label_key("dice", n), f"Dice {n}", 3) for n in soi or []]
        for key, name, digits in (("dice", "Dice", 3), *per_label, ("landmark_error", "TRE", 2)):
            vals = [getattr(res, s)[i].get(key) for s in stages]
            if any(x is not None and math.isfinite(x) for x in vals):
                lines.append(f"{name} {_arrow(vals, digits)}")
        if lines:
            top = [cols[-1]] if k == 0 else []
            axes[k * nplanes, -1].set_title("\n".join([*top, *lines]), fontsize=7)
    names = " → ".join(STAGE_NAMES[s] for s in stages)
    fig.suptitle(f"metrics: {names}", fontsize=8)
    if with_seg:
        _legend(fig, labels, f"warped source ({stage})", soi)
    return fig


def pair_grid(ps, res, path: Path, max_pairs: int = 4,
              pairs: Sequence[int] | None = None, names: Sequence[str] | None = None) -> None:
    """Rows of pairs: source, target, S', T', warped source, SoI contours on the target.

    ``res`` is an :class:`istn.engine.evaluate.Evaluation` (refined images where
    present; the stage is named in the column title). ``pairs``: the indices to show
    (default the first ``max_pairs``). Each pair's Dice and TRE (landmark error) over
    the stages unregistered → predicted (→ refined) head its last panel. Geometry
    (spacing, direction) is the target's network grid. A SoI of several structures (one
    channel each, ``names`` in the legend): one contour colour per structure, Dice per
    structure; S', T' as :func:`_composite`.
    """
    indices = list(range(min(max_pairs, len(ps)))) if pairs is None else list(pairs)
    _save(_pair_figure(ps, res, indices, names), path)


def pair_thumbnail(ps, res, i: int) -> bytes:
    """A small PNG of pair ``i``: the target (3D: axial plane) with the SoI contours of
    the target and the final warped source; a checkerboard of target and warped source
    when there are no segmentations."""
    warped = res.warped_refined if res.warped_refined is not None else res.warped
    sp, dr = _geometry(ps, i)
    with_seg = ps.trg_seg is not None and warped.seg is not None
    maps = [_soi_map(s, i) for s in (ps.trg_seg, warped.seg)] if with_seg else []
    labels = list(range(1, ps.trg_seg.shape[1] + 1)) if with_seg else [1]
    centre = _focus(maps[0], sp, dr) if with_seg else None
    plane, trg = views(ps.trg[i, 0], sp, dr, centre)[0]
    fig, ax = plt.subplots(figsize=(1.6, 1.6))
    if with_seg:
        _show(ax, plane, trg)
        for m, moving in zip(maps, (False, True), strict=True):
            _contours(ax, views(m, sp, dr, centre)[0][1], labels, moving)
    else:
        _show(ax, plane, checkerboard(trg, views(warped.src[i, 0], sp, dr, centre)[0][1]))
    ax.axis("off")
    fig.subplots_adjust(0, 0, 1, 1)
    return _png(fig)


def itn_thumbnail(ps, res, i: int) -> bytes | None:
    """ITN(source) | ITN(target) of pair ``i`` as a small PNG; None without an ITN."""
    if res.src_prime is None:
        return None
    sp, dr = _geometry(ps, i)
    fig, axes = plt.subplots(1, 2, figsize=(3.2, 1.6))
    for ax, t in zip(axes, (_composite(res.src_prime[i]), _composite(res.trg_prime[i])),
                     strict=True):
        plane, img = views(t, sp, dr)[0]
        _show(ax, plane, img)
        ax.axis("off")
    fig.subplots_adjust(0, 0, 1, 1, wspace=0.02)
    return _png(fig)


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Alternate tiles of ``a`` and ``b`` (both scaled to [0, 1])."""
    def s(v):
        lo, hi = np.percentile(v, [1, 99])
        return np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(v)

    idx = np.indices(a.shape)
    cell = [np.maximum(n // tiles, 1) for n in a.shape]
    mask = sum(i // c for i, c in zip(idx, cell, strict=True)) % 2 == 0
    return np.where(mask, s(a), s(b))


def registration_figure(before: np.ndarray, target: np.ndarray, warped: np.ndarray,
                        target_seg: np.ndarray | None, source_seg: np.ndarray | None,
                        warped_seg: np.ndarray | None, path: Path, *,
                        spacing: Sequence[float] | None = None,
                        direction: Sequence[float] | None = None,
                        tre: tuple[float | None, float | None] | None = None,
                        stage: str = "registered") -> None:
    """Source, target, warped source, checkerboard, SoI contours before/after (PNG).

    All arrays lie on the target's grid (SimpleITK array order); ``spacing`` (x, y[, z])
    and ``direction`` (flat or matrix, SimpleITK's ``GetDirection()``) are the target's
    (default: unit spacing, identity direction). Dice per label before and after
    (computed here from the label maps) and ``tre`` (landmark error before, after) head
    the figure; ``stage`` names the result (e.g. "predicted", "refined").
    """
    with_seg = target_seg is not None and source_seg is not None and warped_seg is not None
    cols = ["source (on target grid, unregistered)", "target", f"warped source ({stage})",
            "checkerboard target / warped"]
    maps = [_label_map(s) for s in (target_seg, source_seg, warped_seg)] if with_seg else []
    labels = _labels(*maps)
    lines = []
    if with_seg:
        dice = {lab: (_dice(maps[1] == lab, maps[0] == lab), _dice(maps[2] == lab, maps[0] == lab))
                for lab in labels}
        mean = [_mean([d[k] for d in dice.values()]) for k in (0, 1)]
        tag = " (mean over labels)" if len(labels) > 1 else ""
        cols += [f"SoI before\nDice {_fmt(mean[0])}{tag}",
                 f"SoI after ({stage})\nDice {_fmt(mean[1])}{tag}"]
        lines.append("Dice before → after: " + (
            _arrow(dice[labels[0]]) if len(labels) == 1 else
            ", ".join(f"label {lab} {_arrow(d)}" for lab, d in dice.items())))
    if tre is not None and any(t is not None for t in tre):
        lines.append(f"TRE before → after: {_arrow(tre, 2)}")
    centre = _focus(maps[0], spacing, direction) if with_seg else None
    v = lambda a: views(a, spacing, direction, centre)  # noqa: E731
    vb, vt, vw = v(before), v(target), v(warped)
    vs = [v(m) for m in maps]
    rows = len(vt)
    fig, axes = plt.subplots(rows, len(cols), figsize=(2.6 * len(cols), 2.6 * rows + 0.9),
                             squeeze=False, layout="constrained")
    for r in range(rows):
        plane = vt[r][0]
        panels = [vb[r][1], vt[r][1], vw[r][1], checkerboard(vt[r][1], vw[r][1])]
        if with_seg:
            panels += [vb[r][1], vw[r][1]]
        for c, im in enumerate(panels):
            _show(axes[r, c], plane, im)
            if r == 0:
                axes[0, c].set_title(cols[c], fontsize=8)
        if with_seg:
            segs = [m[r][1] for m in vs]
            for c, moving in ((4, segs[1]), (5, segs[2])):
                _contours(axes[r, c], segs[0], labels, moving=False)
                _contours(axes[r, c], moving, labels, moving=True)
        if plane.name:
            axes[r, 0].set_ylabel(plane.name, fontsize=8)
    if lines:
        fig.suptitle("\n".join(lines), fontsize=9)
    if with_seg:
        _legend(fig, labels, "source / warped source")
    _save(fig, path)


# ------------------------------------------------------------------ HTML cohort report

# metric key: (column title, digits, better when "high" | "low")
HTML_METRICS = {"dice": ("Dice", 3, "high"), "hd95": ("HD95", 2, "low"),
                "tre": ("TRE", 2, "low"), "tre_gt": ("TRE (true transform)", 2, "low"),
                "folding": ("folding %", 3, "low")}
HTML_STAGES = ("unregistered", "predicted", "refined", "registered")
WORSE_DICE = 0.001  # refinement "made it worse": Dice down by more than this...
WORSE_TRE = 1.01  # ... or TRE up by more than 1 %


@dataclass
class PairReport:
    """One pair's row of the cohort report.

    ``values`` maps ``(metric, label, stage)`` to a number (None or NaN: undefined):
    metric a key of ``HTML_METRICS``, label ``""`` for metrics not per label, stage one
    of ``HTML_STAGES``. Pictures are ``<img src>`` strings: ``data:`` URIs
    (:func:`data_uri`) or paths relative to the page (:func:`relative_src`).
    """

    name: str
    values: dict[tuple[str, str, str], float | None]
    thumbnail: str | None = None
    picture: str | None = None  # the full picture the thumbnail opens
    extras: list[tuple[str, str]] = field(default_factory=list)  # (caption, src): ITN outputs


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def relative_src(target: Path, page: Path) -> str:
    """``target`` as a URL relative to the folder of ``page`` (so the folder can move)."""
    rel = Path(os.path.relpath(Path(target).resolve(), Path(page).resolve().parent))
    return quote(rel.as_posix())


def _finite(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _final_stage(pairs: Sequence[PairReport]) -> str | None:
    present = {k[2] for p in pairs for k, v in p.values.items() if _finite(v) is not None}
    for stage in ("refined", "registered", "predicted"):
        if stage in present:
            return stage
    return None


@dataclass(frozen=True)
class Flag:
    """An outlier flag: its message and the table cell it points at (None: the whole row)."""

    text: str
    cell: tuple[str, str, str] | None = None


def cohort_flags(pairs: Sequence[PairReport]) -> list[list[Flag]]:
    """The outlier flags of every pair.

    * refinement made it worse: Dice (any label) after refinement lower than the
      predicted Dice by more than ``WORSE_DICE``, or TRE higher by more than 1 %;
    * folding: a Jacobian determinant ≤ 0 somewhere (folding % > 0);
    * low Dice: the final stage's Dice of a label below the cohort's lower Tukey fence
      ``Q1 − 1.5·IQR`` (quartiles over the pairs with that label, ``numpy.percentile``,
      linear interpolation; only with at least 4 such pairs).
    """
    flags: list[list[Flag]] = [[] for _ in pairs]
    final = _final_stage(pairs)
    labels = sorted({k[1] for p in pairs for k in p.values if k[0] == "dice"})
    fences = {}
    for lab in labels:
        vals = [v for p in pairs if (v := _finite(p.values.get(("dice", lab, final))))
                is not None]
        if len(vals) >= 4:
            q1, q3 = np.percentile(vals, [25, 75])
            fences[lab] = q1 - 1.5 * (q3 - q1)
    for p, out in zip(pairs, flags, strict=True):
        for (metric, lab, stage), v in sorted(p.values.items()):
            if stage != "refined" or (v := _finite(v)) is None:
                continue
            before = _finite(p.values.get((metric, lab, "predicted")))
            name = HTML_METRICS[metric][0] + (f" {lab}" if lab else "")
            if before is None:
                continue
            if (metric == "dice" and v < before - WORSE_DICE) or (
                    metric in ("tre", "tre_gt") and v > before * WORSE_TRE and v > before):
                out.append(Flag(f"refinement made {name} worse ({_fmt(before)} → {_fmt(v)})",
                                (metric, lab, stage)))
        folding = [f for k, v in p.values.items() if k[0] == "folding"
                   and (f := _finite(v)) is not None and f > 0]
        if folding:
            out.append(Flag(f"folding: {_fmt(max(folding))} % of voxels with Jacobian ≤ 0"))
        for lab, fence in fences.items():
            v = _finite(p.values.get(("dice", lab, final)))
            if v is not None and v < fence:
                name = "Dice" + (f" {lab}" if lab else "")
                out.append(Flag(f"low {name}: {_fmt(v)} < Q1 − 1.5·IQR = {_fmt(fence)}",
                                ("dice", lab, final)))
    return flags


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}
.notes{color:#444;max-width:70em}
table{border-collapse:collapse;margin-top:1em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:middle}
th{background:#f0f0f0;position:sticky;top:0;cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
td.name,td.flags{text-align:left}
td.flags span{display:block;background:#fde0dc;color:#a00;border-radius:3px;
 padding:0 4px;margin:1px 0;font-size:12px}
tr.flagged td.name{border-left:4px solid #c00}
td.worse{background:#fde0dc}
tfoot td{background:#f7f7f7;font-style:italic}
img.thumb{height:96px;cursor:zoom-in;display:block}
#viewer{position:fixed;inset:0;background:rgba(0,0,0,.85);display:flex;
 flex-direction:column;align-items:center;justify-content:center;cursor:zoom-out}
#viewer[hidden]{display:none}
#viewer img{max-width:96vw;max-height:90vh;background:#fff}
#viewer p{color:#fff}
"""

# Sorting: numbers by value, text by locale; missing values always last. Clicking a
# thumbnail shows its full picture in an overlay (links to data: URIs are blocked).
_JS = """
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0], i = th.cellIndex;
  const num = th.dataset.type === 'num';
  const asc = th.getAttribute('aria-sort') !== 'ascending';
  for (const h of th.parentNode.cells) h.removeAttribute('aria-sort');
  th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = a.cells[i].dataset.v, y = b.cells[i].dataset.v;
    if (x === '' || y === '') return (x === '') - (y === '');
    const c = num ? Number(x) - Number(y) : x.localeCompare(y);
    return asc ? c : -c;
  });
  for (const r of rows) body.appendChild(r);
}
for (const th of document.querySelectorAll('th[data-type]')) {
  th.addEventListener('click', () => sortBy(th));
}
const viewer = document.getElementById('viewer');
for (const img of document.querySelectorAll('img[data-full]')) {
  img.addEventListener('click', () => {
    viewer.querySelector('img').src = img.dataset.full;
    viewer.querySelector('p').textContent = img.alt;
    viewer.hidden = false;
  });
}
viewer.addEventListener('click', () => { viewer.hidden = true; });
document.addEventListener('keydown', e => { if (e.key === 'Escape') viewer.hidden = true; });
"""


def cohort_html(pairs: Sequence[PairReport], path: Path, title: str = "istn cohort report",
                notes: Sequence[str] = ()) -> None:
    """One self-contained HTML page (inline CSS and JS, no server needed) for a cohort.

    A table with one row per pair, sortable by clicking a column header: the pair, its
    outlier flags (:func:`cohort_flags`), a thumbnail that opens the full picture, the
    ITN outputs where given, then every metric (per label, per stage), with the
    medians below. ``notes`` are extra lines (plain text) under the title.
    """
    esc = html.escape
    keys = sorted({k for p in pairs for k in p.values},
                  key=lambda k: (list(HTML_METRICS).index(k[0]), _label_key(k[1]),
                                 HTML_STAGES.index(k[2])))
    multi = len({k[1] for k in keys if k[1]}) > 1
    flags = cohort_flags(pairs)
    extras = max((len(p.extras) for p in pairs), default=0)
    head = ['<th data-type="text">pair</th>', '<th data-type="num">flags</th>',
            "<th>overlay</th>"]
    head += [f"<th>{esc(p)}</th>" for p in _extra_titles(pairs, extras)]
    for metric, lab, stage in keys:
        name = HTML_METRICS[metric][0] + (f" {lab}" if lab and multi else "")
        head.append(f'<th data-type="num">{esc(name)}<br><small>{esc(stage)}</small></th>')
    body = []
    for p, fl in zip(pairs, flags, strict=True):
        cells = [f'<td class="name" data-v="{esc(p.name)}">{esc(p.name)}</td>',
                 f'<td class="flags" data-v="{len(fl)}">'
                 + "".join(f"<span>{esc(f.text)}</span>" for f in fl) + "</td>",
                 "<td>" + _img(p.thumbnail, p.picture, f"{p.name}: overlay") + "</td>"]
        for j in range(extras):
            cap, src = p.extras[j] if j < len(p.extras) else ("", None)
            cells.append("<td>" + _img(src, src, f"{p.name}: {cap}") + "</td>")
        for metric, lab, stage in keys:
            v = _finite(p.values.get((metric, lab, stage)))
            cls = ' class="worse"' if any(f.cell == (metric, lab, stage) for f in fl) else ""
            text = "–" if v is None else _fmt(v, HTML_METRICS[metric][1])
            cells.append(f'<td{cls} data-v="{"" if v is None else repr(v)}">{text}</td>')
        row_cls = ' class="flagged"' if fl else ""
        body.append(f"<tr{row_cls}>" + "".join(cells) + "</tr>")
    foot = [f'<td class="name">median</td><td>{sum(bool(f) for f in flags)} flagged</td>',
            "<td></td>" * (1 + extras)]
    for k in keys:
        vals = [v for p in pairs if (v := _finite(p.values.get(k))) is not None]
        foot.append(f"<td>{_fmt(np.median(vals), HTML_METRICS[k[0]][1]) if vals else '–'}</td>")
    explain = [
        f"{len(pairs)} pairs, {sum(bool(f) for f in flags)} flagged. Click a column header "
        "to sort (again to reverse; missing values last), a thumbnail to open its picture.",
        "Stages: unregistered (identity), predicted (the network), refined (after test-time "
        "refinement), registered (istn register's result). Dice: 2|A∩B|/(|A|+|B|). HD95: "
        "95th percentile of the pooled surface-to-surface distances. TRE: mean landmark "
        "distance. Distances in the images' physical units (mm for NIfTI).",
        "Contours: target lime, warped source magenta (several labels: one colour per "
        "label, target solid, warped source dashed).",
        f"Flags: refinement made it worse (Dice down by more than {WORSE_DICE} or TRE up "
        "by more than 1 %); folding (Jacobian determinant ≤ 0 somewhere); low Dice (below "
        "the cohort's Q1 − 1.5·IQR for that label, with at least 4 pairs).",
        *notes]
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        '<div class="notes">' + "".join(f"<p>{esc(n)}</p>" for n in explain) + "</div>",
        '<table id="pairs"><thead><tr>' + "".join(head) + "</tr></thead>",
        "<tbody>", *body, "</tbody>",
        "<tfoot><tr>" + "".join(foot) + "</tr></tfoot></table>",
        '<div id="viewer" hidden><img alt=""><p></p></div>',
        f"<script>{_JS}</script>", "</body></html>", ""])
    write_atomically(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))


def _label_key(lab: str) -> tuple:
    return (0, int(lab), "") if lab.isdigit() else (1, 0, lab)


def _extra_titles(pairs: Sequence[PairReport], n: int) -> list[str]:
    titles = [""] * n
    for p in pairs:
        for j, (cap, _) in enumerate(p.extras):
            titles[j] = titles[j] or cap
    return titles


def _img(src: str | None, full: str | None, alt: str) -> str:
    if src is None:
        return "–"
    full_attr = f' data-full="{html.escape(full)}"' if full else ""
    return f'<img class="thumb" src="{html.escape(src)}" alt="{html.escape(alt)}"{full_attr}>'


def pairs_from_test(names: Sequence[str], rows: Mapping[str, Sequence[Mapping] | None],
                ps=None, res=None, soi_names: Sequence[str] | None = None
                ) -> list[PairReport]:
    """Rows of ``istn test``'s report from its per-stage metric rows (in the order of
    ``names``) and, for the pairs in ``ps`` (this process's PairSet and Evaluation),
    thumbnails, full pictures and ITN outputs drawn here. ``soi_names``: the structures
    of a multi-label SoI (Dice and HD95 per structure beside their means)."""
    keys = {("dice", ""): "dice", ("hd95", ""): "hd95", ("tre", ""): "landmark_error",
            ("tre_gt", ""): "landmark_error_gt"}
    for n in soi_names or []:
        keys.update({(m, n): label_key(m, n) for m in ("dice", "hd95")})
    local = {n: i for i, n in enumerate(ps.names)} if ps is not None and res is not None \
        else {}
    out = []
    for j, name in enumerate(names):
        values = {}
        for stage, stage_rows in rows.items():
            if stage_rows is None:
                continue
            for (metric, lab), src_key in keys.items():
                v = _finite(stage_rows[j].get(src_key))
                if v is not None:
                    values[(metric, lab, STAGE_NAMES[stage])] = v
        p = PairReport(name, values)
        if name in local:
            i = local[name]
            p.thumbnail = data_uri(pair_thumbnail(ps, res, i))
            p.picture = data_uri(_png(_pair_figure(ps, res, [i], soi_names), dpi=80))
            itn = itn_thumbnail(ps, res, i)
            if itn is not None:
                p.extras.append(("ITN(source) | ITN(target)", data_uri(itn)))
        out.append(p)
    return out


def pairs_from_register(names: Sequence[str], folders: Sequence[Path], page: Path
                    ) -> list[PairReport]:
    """Rows of ``istn register --pairs``'s report from each pair folder's ``metrics.json``
    (Dice and HD95 per label, landmark error before/after, folding %) and ``report.png``
    (linked relative to ``page``)."""
    out = []
    for name, folder in zip(names, folders, strict=True):
        mfile = layout.register_file(folder, "metrics")
        m = json.loads(mfile.read_text()) if mfile.is_file() else {}
        values: dict[tuple[str, str, str], float | None] = {}
        for lab, lm in (m.get("labels") or {}).items():
            for metric in ("dice", "hd95"):
                values[(metric, str(lab), "registered")] = _finite(lm.get(metric))
        for key, metric, stage in (("landmark_error_identity", "tre", "unregistered"),
                                   ("landmark_error", "tre", "registered"),
                                   ("jacobian_folding_percent", "folding", "registered")):
            if key in m:
                values[(metric, "", stage)] = _finite(m[key])
        pic = layout.register_file(folder, "report")
        src = relative_src(pic, page) if pic.is_file() else None
        out.append(PairReport(name, values, thumbnail=src, picture=src))
    return out

"""Pictures and TensorBoard helpers (files only; never an interactive window)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # batch jobs: render to files, never to a screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .io import write_atomically  # noqa: E402


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
        tiles += [res.src_prime[i, 0], res.trg_prime[i, 0]]
    return torch.cat([_scale01(mosaic(t.float().cpu())) for t in tiles], dim=1)


def _save(fig, path: Path) -> None:
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def loss_curve(history: list[dict], path: Path) -> None:
    """Training (and validation) loss per epoch as a PNG."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["train_loss"] for h in history], label="train")
    val = [(h["epoch"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def pair_grid(ps, res, path: Path, max_pairs: int = 4) -> None:
    """Rows of pairs: source, target, S', T', warped source, warped SoI over target.

    ``res`` is an :class:`istn.engine.evaluate.Evaluation` (refined images where present).
    """
    warped = res.warped_refined if res.warped_refined is not None else res.warped
    cols = ["source", "target"]
    if res.src_prime is not None:
        cols += ["ITN(source)", "ITN(target)"]
    cols += ["warped source", "SoI: target (green) / warped (magenta)"]
    n = min(max_pairs, len(ps))
    fig, axes = plt.subplots(n, len(cols), figsize=(2.6 * len(cols), 2.6 * n), squeeze=False)
    for r in range(n):
        imgs = [ps.src[r, 0], ps.trg[r, 0]]
        if res.src_prime is not None:
            imgs += [res.src_prime[r, 0], res.trg_prime[r, 0]]
        imgs += [warped.src[r, 0]]
        for c, im in enumerate(imgs):
            axes[r, c].imshow(middle_slice(im), cmap="gray")
        ax = axes[r, len(imgs)]
        ax.imshow(middle_slice(ps.trg[r, 0]), cmap="gray")
        if ps.trg_seg is not None and warped.seg is not None:
            ax.contour(middle_slice(ps.trg_seg[r, 0]) > 0.5, levels=[0.5], colors="lime",
                       linewidths=0.8)
            ax.contour(middle_slice(warped.seg[r, 0]) > 0.5, levels=[0.5], colors="magenta",
                       linewidths=0.8)
        for c, title in enumerate(cols):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[0, c].set_title(title, fontsize=8)
        axes[r, 0].set_ylabel(ps.names[r], fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _views(a: np.ndarray | None) -> list[np.ndarray | None]:
    """2D: the image; 3D: three orthogonal slices through the centre."""
    if a is None:
        return [None]
    if a.ndim == 2:
        return [a]
    z, y, x = a.shape
    return [a[z // 2], a[:, y // 2], a[:, :, x // 2]]


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
                        warped_seg: np.ndarray | None, path: Path) -> None:
    """Source, target, warped source, checkerboard, SoI contours before/after (PNG)."""
    cols = ["source (on target grid)", "target", "warped source", "checkerboard"]
    with_seg = target_seg is not None and source_seg is not None and warped_seg is not None
    if with_seg:
        cols += ["SoI before", "SoI after"]
    vb, vt, vw = _views(before), _views(target), _views(warped)
    vts, vss, vws = _views(target_seg), _views(source_seg), _views(warped_seg)
    rows = len(vt)
    fig, axes = plt.subplots(rows, len(cols), figsize=(2.6 * len(cols), 2.6 * rows),
                             squeeze=False)
    for r in range(rows):
        panels = [vb[r], vt[r], vw[r], checkerboard(vt[r], vw[r])]
        for c, im in enumerate(panels):
            axes[r, c].imshow(im, cmap="gray")
        if with_seg:
            for c, (bg, moving) in enumerate(((vb[r], vss[r]), (vw[r], vws[r])), start=4):
                axes[r, c].imshow(bg, cmap="gray")
                for seg, color in ((vts[r], "lime"), (moving, "magenta")):
                    if np.any(seg > 0) and not np.all(seg > 0):
                        axes[r, c].contour(seg > 0, levels=[0.5], colors=color, linewidths=0.8)
        for c in range(len(cols)):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[0, c].set_title(cols[c], fontsize=8)
    fig.tight_layout()
    _save(fig, path)

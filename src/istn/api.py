"""The Python API: load a model, register pairs in memory, train.

Images are ``sitk.Image`` objects (geometry kept), file paths, or numpy arrays in
SimpleITK order (z, y, x) with unit spacing, zero origin and identity direction.
Transforms follow ITK's resampling convention: ``result.transform`` maps target points
to source points, so ``sitk.Resample(source, target, result.transform)`` reproduces
``result.warped``; ``result.inverse`` maps source points to target points. The command
line (``istn register``, ``istn train``) runs the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from .engine.checkpoint import load_model as _load_checkpoint
from .engine.model import Model
from .engine.register import Registration, read_inputs, register_inputs
from .errors import IstnError

ImageLike = str | Path | sitk.Image | np.ndarray

__all__ = ["Model", "Registration", "load_model", "register", "register_many", "train"]


def _device(device: str | torch.device | None) -> torch.device:
    from .engine.distributed import select_device

    return device if isinstance(device, torch.device) else select_device(device)


def load_model(path: str | Path, device: str | torch.device | None = None,
               amp: bool = False) -> Model:
    """A trained model from a model folder (``OUT/train/model``) or a checkpoint file.

    Loaded safely (tensors and plain values only) and checked; on ``device`` (default
    ``cuda:0`` when present, else the CPU), in evaluation mode.
    """
    model, _ = _load_checkpoint(path, amp=amp)
    return model.to(_device(device)).eval()


def register(model: Model, source: ImageLike, target: ImageLike, refine: int | None = None,
             source_seg: ImageLike | None = None, target_seg: ImageLike | None = None,
             source_points: Any = None, target_points: Any = None,
             seg_threshold: float | None = None, progress: bool = False,
             warp: bool = True) -> Registration:
    """Register ``source`` (moving) onto ``target`` (fixed); nothing is written to disk.

    ``refine`` test-time refinement iterations (default: the model's config). With
    segmentations (label maps; ``seg_threshold`` binarises soft maps) the result holds
    the warped source labels and per-label overlap metrics; with landmark points
    ([N, dim] physical arrays or CSV files, rows corresponding) the landmark error.
    ``warp=False`` returns the transforms only (``warped``, ``warped_seg`` None, no
    overlap or Jacobian metrics, and for cascades no total ``field``), which is all a
    registration needs when the warping is done later.
    Returns a :class:`~istn.engine.register.Registration` (``warped``, ``transform``,
    ``inverse``, ``metrics``, ...).
    """
    return register_many(model, [(source, target)], refine,
                         [(source_seg, target_seg)], [(source_points, target_points)],
                         seg_threshold, progress, warp)[0]


def register_many(model: Model, pairs: Sequence[tuple[ImageLike, ImageLike]],
                  refine: int | None = None,
                  segs: Sequence[tuple[ImageLike | None, ImageLike | None]] | None = None,
                  points: Sequence[tuple[Any, Any]] | None = None,
                  seg_threshold: float | None = None,
                  progress: bool = False, warp: bool = True) -> list[Registration]:
    """Register (source, target) pairs, batched through the networks and the refinement.

    ``segs`` and ``points`` are parallel to ``pairs`` (None entries allowed). Every
    input is checked before anything is computed. ``warp`` as in :func:`register`.
    """
    if segs is not None and len(segs) != len(pairs) or \
            points is not None and len(points) != len(pairs):
        raise IstnError("segs and points must list one entry per pair")
    inputs = [read_inputs(pair, segs[i] if segs else (None, None),
                          points[i] if points else (None, None), seg_threshold)
              for i, pair in enumerate(pairs)]
    iterations = model.cfg.refine if refine is None else refine
    if iterations < 0:
        raise IstnError(f"refine must be >= 0, got {iterations}")
    device = next(model.parameters()).device
    return register_inputs(model, inputs, device, iterations, progress, warp)


def train(config: str | Path | None, train: str | Path, out: str | Path,
          train_seg: str | Path | None = None, strategy: str = "i",
          transformation: str = "affine", val: str | Path | None = None,
          val_seg: str | Path | None = None, seed: int = 0, resume: bool = False,
          device: str | torch.device | None = None, progress: bool = True,
          **overrides: Any) -> Model:
    """Train a model on the pairs of CSV files; returns it, trained (also saved in ``out``).

    ``config``: a JSON/YAML file (None: defaults); ``overrides``: config keys (e.g.
    ``epochs=20``). The model folder is ``out/train/model``, as with ``istn train``.
    """
    from .config import load_config
    from .data import load_pairs
    from .engine.train import train as _train

    cfg = load_config(config, overrides)
    torch.manual_seed(seed)
    model = Model(cfg, strategy, transformation)
    train_set = load_pairs(cfg, train, train_seg)
    val_set = load_pairs(cfg, val, val_seg) if val is not None else None
    _train(model, train_set, val_set, Path(out), _device(device), seed, resume,
           progress=progress)
    return model.eval()

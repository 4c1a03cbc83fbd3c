"""Typed configuration: the published JSON keys plus optional extensions.

``size`` and ``spacing`` are in SimpleITK order (x, y[, z]); their length sets the
dimension. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import IstnError
from .similarity import check_similarity
from .spatial import transformation_class

NORMALIZERS = ("none", "zero_mean_unit_var", "range_matching", "zero_one", "threshold_zero")
REFINE_MODES = ("weights", "params", "lm")
REFINE_INPUTS = ("primes", "images", "local")
REFINE_STAGES = ("joint", "sequential")
NETWORK_SCALINGS = ("auto", "none")
GRID_ORIENTATIONS = ("world", "image")
GRID_CENTRES = ("image", "mass")
# Keys a config saved by an older istn (a checkpoint's) may lack, with the value that
# reproduces that version's behaviour; used by ``from_dict(..., legacy=True)``.
LEGACY_DEFAULTS: dict[str, Any] = {"grid_orientation": "image", "grid_centre": "image"}


@dataclass
class Config:
    """Training/testing configuration (defaults: the published synthetic 2D values).

    Published keys: epochs, refine, learning_rate, batch_size, val_interval,
    normalizer_img, normalizer_seg, size, spacing. The rest are optional
    extensions whose defaults reproduce the published behaviour.
    """

    epochs: int = 100
    refine: int = 50
    learning_rate: float = 1e-3
    batch_size: int = 10
    val_interval: int = 10
    normalizer_img: str = "none"
    normalizer_seg: str = "none"
    size: list[int] = field(default_factory=lambda: [128, 128])
    spacing: list[float] = field(default_factory=lambda: [1.0, 1.0])
    # Extensions: affine bounds (normalised units / radians / log-scale).
    max_translation: float = 0.1
    # Extension: the translation bound in physical units (mm per axis; null: max_translation).
    max_translation_mm: float | None = None
    max_rotation: float = math.pi / 4
    max_scaling: float = 0.2
    max_shearing: float = math.pi / 4
    # Extension: the STN's architecture for an affine. 0: the published encoder and
    # regression head; n >= 2: a keypoint STN, whose shared network marks n per axis
    # (n^dim) keypoints in S' and in T' and whose affine is their least-squares fit.
    stn_keypoints: int = 0
    # Extensions: B-spline model.
    bspline_spacing: int = 10
    max_displacement: float = 0.2
    bspline_zero_init: bool = False
    smoothness: float = 0.0
    bending: float = 0.0
    # Extensions: SVF model (velocity on the B-spline control grid; scaling and squaring).
    svf_steps: int = 7
    # Integrate the velocity on every svf_stride-th voxel per axis (1: the network grid).
    svf_stride: int = 1
    # Extensions: the similarity of the STN losses and of refinement (see istn.similarity).
    similarity: str = "mse"
    # Extensions: refinement ('weights' = fine-tune the STN as published,
    # 'params' = optimise the transformation parameters directly; with refine_stages
    # 'sequential' also one per cascade stage, e.g. 'weights+params').
    refine_mode: str = "weights"
    refine_learning_rate: float | None = None
    refine_batch: int = 0
    # Extensions: what refinement compares ('primes': S', T' as published; 'images';
    # 'local': the images standardised in local windows), its similarity (null:
    # 'similarity'), an early stop (relative loss decrease over 10 iterations below which
    # every pair counts as converged; 0: off) and the voxels it compares (0: all; N: N
    # voxels per pair drawn once, where the target has structure).
    refine_inputs: str = "primes"
    refine_similarity: str | None = None
    refine_tolerance: float = 0.0
    refine_samples: int = 0
    # Extension: coarse-to-fine refinement levels (Gaussian blur 2^(L-1-k) voxels, then none).
    refine_levels: int = 1
    # Extension: refinement on images k times finer than the network grid (same extent;
    # istn register and the API; needs refine_samples).
    refine_resolution: int = 1
    # Extension: a cascade's stages refined together ('joint') or one after another
    # ('sequential': affine first, then the deformable stage; 'refine' iterations each).
    refine_stages: str = "joint"
    # Extension: training pairs: 'listed' (the CSV's pairs, as published) or 'random'
    # (each epoch, as many random pairs of the distinct training images as are listed).
    train_pairing: str = "listed"
    # Extensions: training robustness. 'auto': the networks see intensities standardised
    # by the training set's mean and standard deviation (the ITN's output is mapped back
    # to SoI units, so losses and metrics keep the data's units); 'none': raw values, as
    # published. restarts: how often training starts again from a fresh initialisation
    # when a ReLU layer of the ITN or STN has died (0: never, as published).
    network_scaling: str = "auto"
    restarts: int = 3
    # Extensions: the network grid in physical space. grid_orientation 'world': axes
    # along the physical x, y[, z] (identity direction), so storage order, flips and
    # oblique headers do not change what the networks see; 'image': each image's own
    # direction (checkpoints without the key). grid_centre 'image': the image's physical
    # centre; 'mass': its intensity centre of mass (inside its mask), an initial
    # translation as SimpleITK's MOMENTS initialiser. Identical for 2D PNGs either way.
    grid_orientation: str = "world"
    grid_centre: str = "image"
    # Extensions: a SoI of several structures, one channel each (ITN outputs, STN input
    # of ISTN-e/-i, losses and metrics per channel). labels: the label values of a
    # label-map SoI, each one channel (one-hot); soi_components: the number of components
    # per voxel of a probability-map SoI (a multi-component image, one structure per
    # component). Both unset (null, 1): one channel, the SoI's values as they are.
    labels: list[int] | None = None
    soi_components: int = 1
    # Extensions: the dissimilarity of the terms that compare with a SoI (loss_itn,
    # loss_stn_s, loss_stn_i), e.g. 'dice' or 'mse+dice'; null: loss_itn MSE and the
    # STN terms 'similarity' (the published losses).
    soi_loss: str | None = None

    @property
    def dim(self) -> int:
        return len(self.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape in array order (z, y, x)."""
        return tuple(self.size[::-1])

    @property
    def soi_channels(self) -> int:
        """Channels of the SoI (and of the ITN's output): one per structure."""
        return len(self.labels) if self.labels is not None else self.soi_components

    @property
    def soi_names(self) -> list[str] | None:
        """The structures' names in metrics (label values, else component numbers 1, 2, ...);
        None for the single-channel SoI of today's configs (no per-label metrics)."""
        if self.labels is not None:
            return [str(v) for v in self.labels]
        if self.soi_components > 1:
            return [str(k + 1) for k in range(self.soi_components)]
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stn_options(self, transformation: str) -> dict[str, Any]:
        """Keyword arguments of the transformation model, from the keys it names."""
        cls = transformation_class(transformation)
        return {arg: getattr(self, key) for arg, key in cls.options.items()}


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _check_type(key: str, value: Any, source: str) -> Any:
    kind = _FIELDS[key].type
    def bad(want: str) -> IstnError:
        return IstnError(f"{source}: key '{key}' must be {want}, got {value!r}")

    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif kind in ("float", "float | None"):
        if value is None and kind == "float | None":
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number" + (" or null" if kind == "float | None" else ""))
        try:
            value = float(value)
        except OverflowError:
            raise bad("a finite number") from None
        if not math.isfinite(value):
            raise bad("a finite number")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind in ("str", "str | None"):
        if value is None and kind == "str | None":
            return None
        if not isinstance(value, str):
            raise bad("a string" + (" or null" if kind == "str | None" else ""))
    elif kind == "list[int] | None":  # 'labels'
        if value is None:
            return None
        if not isinstance(value, list | tuple) or not value or any(
                isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                or v != int(v) for v in value):
            raise bad("a non-empty list of integer label values (e.g. [1, 2]) or null")
        value = [int(v) for v in value]
    elif kind.startswith("list"):
        item = int if "int" in kind else float
        if not isinstance(value, list | tuple) or not value:
            raise bad("a list of 2 or 3 numbers")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise bad("a list of numbers")
            try:
                finite = math.isfinite(v)
            except OverflowError:
                finite = False
            if not finite:
                raise bad("a list of finite numbers")
            if item is int and v != int(v):
                raise bad("a list of integers")
        value = [item(v) for v in value]
    return value


def validate(cfg: Config, source: str = "config") -> Config:
    """Check value ranges and consistency; raise IstnError naming the key."""
    def err(key: str, msg: str) -> IstnError:
        return IstnError(f"{source}: key '{key}' {msg}")

    for key in ("epochs", "batch_size", "val_interval"):
        if getattr(cfg, key) < 1:
            raise err(key, f"must be >= 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.svf_steps <= 16:
        raise err("svf_steps", f"must be between 0 and 16, got {cfg.svf_steps}")
    if cfg.svf_stride < 1:
        raise err("svf_stride", f"must be >= 1 (1: integrate on the network grid), "
                  f"got {cfg.svf_stride}")
    if cfg.refine < 0:
        raise err("refine", f"must be >= 0, got {cfg.refine}")
    if cfg.restarts < 0:
        raise err("restarts", f"must be >= 0 (0: never restart), got {cfg.restarts}")
    if cfg.network_scaling not in NETWORK_SCALINGS:
        raise err("network_scaling", f"must be one of {', '.join(NETWORK_SCALINGS)}; "
                  f"got '{cfg.network_scaling}'")
    if cfg.grid_orientation not in GRID_ORIENTATIONS:
        raise err("grid_orientation", f"must be one of {', '.join(GRID_ORIENTATIONS)}; "
                  f"got '{cfg.grid_orientation}'")
    if cfg.grid_centre not in GRID_CENTRES:
        raise err("grid_centre", f"must be one of {', '.join(GRID_CENTRES)}; "
                  f"got '{cfg.grid_centre}'")
    if cfg.stn_keypoints < 0 or cfg.stn_keypoints == 1:
        raise err("stn_keypoints", f"must be 0 (the published STN) or >= 2 (keypoints per "
                  f"axis), got {cfg.stn_keypoints}")
    if cfg.refine_batch < 0:
        raise err("refine_batch", "must be >= 0 (0 refines all pairs together)")
    for key in ("learning_rate", "max_scaling", "max_displacement", "bspline_spacing"):
        if not getattr(cfg, key) > 0:
            raise err(key, f"must be > 0, got {getattr(cfg, key)}")
    if cfg.refine_learning_rate is not None and not cfg.refine_learning_rate > 0:
        raise err("refine_learning_rate", "must be > 0 or null")
    if cfg.smoothness < 0:
        raise err("smoothness", "must be >= 0")
    if cfg.bending < 0:
        raise err("bending", "must be >= 0")
    for key in ("normalizer_img", "normalizer_seg"):
        if getattr(cfg, key) not in NORMALIZERS:
            raise err(key, f"must be one of {', '.join(NORMALIZERS)}; got '{getattr(cfg, key)}'")
    for key in ("similarity", "refine_similarity", "soi_loss"):
        name = getattr(cfg, key)
        if name is not None and (problem := check_similarity(name)) is not None:
            raise err(key, f"{'must be null or a similarity: ' if key != 'similarity' else ''}"
                      f"{problem}; got '{name}'")
    if cfg.labels is not None:
        if len(set(cfg.labels)) != len(cfg.labels):
            raise err("labels", f"must list each label value once, got {cfg.labels}")
        if any(v < 0 for v in cfg.labels):
            raise err("labels", f"must hold label values >= 0, got {cfg.labels}")
        if cfg.soi_components != 1:
            raise err("soi_components", "must be 1 with 'labels' (a label map has one "
                      "component; several probability maps: leave 'labels' null)")
    if cfg.soi_components < 1:
        raise err("soi_components", f"must be >= 1, got {cfg.soi_components}")
    if cfg.refine_inputs not in REFINE_INPUTS:
        raise err("refine_inputs", f"must be one of {', '.join(REFINE_INPUTS)}")
    if cfg.refine_tolerance < 0:
        raise err("refine_tolerance", "must be >= 0 (0: no early stop)")
    if cfg.max_translation_mm is not None and not cfg.max_translation_mm > 0:
        raise err("max_translation_mm", "must be > 0 (mm per axis) or null")
    if cfg.train_pairing not in ("listed", "random"):
        raise err("train_pairing", "must be one of listed, random")
    if cfg.refine_resolution < 1:
        raise err("refine_resolution", "must be >= 1 (1: the network grid)")
    if cfg.refine_resolution > 1 and not (cfg.refine_samples and cfg.refine_inputs != "primes"):
        raise err("refine_resolution", "needs refine_samples > 0 and refine_inputs 'images' "
                  "or 'local' (finer images are compared at sampled voxels)")
    if cfg.refine_levels < 1:
        raise err("refine_levels", "must be >= 1 (1: no coarse levels)")
    if cfg.refine_samples < 0:
        raise err("refine_samples", "must be >= 0 (0: every voxel of the network grid)")
    if cfg.refine_samples and (cfg.refine_similarity or cfg.similarity) == "lncc":
        raise err("refine_samples", "needs a similarity of single voxels (mse, mi): LNCC "
                  "compares windows of the whole grid; use refine_inputs 'local' with mse "
                  "(local standardisation, then squared differences) or refine_samples 0")
    if cfg.refine_stages not in REFINE_STAGES:
        raise err("refine_stages", f"must be one of {', '.join(REFINE_STAGES)}")
    modes = cfg.refine_mode.split("+")
    if any(m not in REFINE_MODES for m in modes):
        raise err("refine_mode", f"must be one of {', '.join(REFINE_MODES)}, or one per "
                  "cascade stage joined by '+' (e.g. 'weights+params')")
    if len(modes) > 1 and cfg.refine_stages != "sequential":
        raise err("refine_mode", "one mode per stage needs refine_stages 'sequential'")
    if "lm" in modes and (cfg.refine_similarity or cfg.similarity) != "mse":
        raise err("refine_mode", "'lm' (Levenberg-Marquardt) minimises squared differences: "
                  "it needs refine_similarity 'mse' (with refine_inputs 'local' for images "
                  "that differ in gain or bias); use 'params' for other similarities")
    if len(cfg.size) not in (2, 3):
        raise err("size", f"must have 2 (2D) or 3 (3D) entries, got {cfg.size}")
    if len(cfg.spacing) != len(cfg.size):
        raise err("spacing", f"must have as many entries as 'size' ({len(cfg.size)})")
    if any(s <= 0 for s in cfg.spacing):
        raise err("spacing", f"entries must be > 0, got {cfg.spacing}")
    from .nets.stn import min_stn_size  # local: nets import config-free modules only

    smallest = max(min_stn_size(), 36)
    if any(n % 4 for n in cfg.size):
        raise err("size", f"entries must be divisible by 4 (the ITN down-samples twice), "
                  f"got {cfg.size}")
    if any(n < smallest for n in cfg.size):
        raise err("size", f"entries must be at least {smallest} for the STN encoder, "
                  f"got {cfg.size}")
    return cfg


def from_dict(data: dict[str, Any], source: str = "config", legacy: bool = False) -> Config:
    """Build a validated Config from a mapping (unknown keys are errors).

    ``legacy=True`` for configs saved by istn itself (checkpoints): a key in
    :data:`LEGACY_DEFAULTS` that the saved config lacks takes the value that
    reproduces the older version's behaviour, not today's default.
    """
    if not isinstance(data, dict):
        raise IstnError(f"{source}: expected a JSON/YAML object of key: value pairs")
    if legacy:
        data = {**LEGACY_DEFAULTS, **data}
    unknown = sorted(str(k) for k in set(data) - set(_FIELDS))
    if unknown:
        raise IstnError(
            f"{source}: unknown key '{unknown[0]}'; valid keys: {', '.join(_FIELDS)}"
        )
    values = {k: _check_type(k, v, source) for k, v in data.items()}
    return apply_example_caps(validate(Config(**values), source))


# Environment variables that cap training epochs / refinement iterations, so that CI can
# run the README's commands as written in minutes (tests/test_readme.py). Unset: no effect.
EXAMPLE_CAP_VARS = {"epochs": "ISTN_EXAMPLE_EPOCHS", "refine": "ISTN_EXAMPLE_REFINE",
                    "pairs": "ISTN_EXAMPLE_PAIRS"}
_CAP_LOW = {"epochs": 1, "refine": 0, "pairs": 2}
_CAP_WHAT = {"epochs": "training epochs", "refine": "refinement iterations",
             "pairs": "the brain set's training and test pairs"}
_warned_caps: set[tuple[tuple[str, int], ...]] = set()


def example_caps() -> dict[str, int]:
    """The active caps, {'epochs': N, 'refine': M, 'pairs': P} (only those set); warns
    once per process.

    The one place that reads ``ISTN_EXAMPLE_EPOCHS`` (>= 1), ``ISTN_EXAMPLE_REFINE``
    (>= 0) and ``ISTN_EXAMPLE_PAIRS`` (>= 2). Every config passes through it
    (:func:`from_dict`); ``istn.bench``, which sets its own epochs and iterations, and
    ``istn synth brain`` (pairs) ask it directly.
    """
    caps = {}
    for key, var in EXAMPLE_CAP_VARS.items():
        raw = os.environ.get(var, "").strip()
        if not raw:
            continue
        low = _CAP_LOW[key]
        try:
            caps[key] = int(raw)
        except ValueError:
            caps[key] = low - 1
        if caps[key] < low:
            raise IstnError(f"environment variable {var} must be an integer >= {low}, "
                            f"got {raw!r}")
    seen = tuple(sorted(caps.items()))
    if caps and seen not in _warned_caps:
        _warned_caps.add(seen)
        said = " and ".join(f"{_CAP_WHAT[k]} at {v} ({EXAMPLE_CAP_VARS[k]})"
                            for k, v in caps.items())
        print(f"istn: warning: capping {said}: for quick checks only; unset for real runs",
              file=sys.stderr, flush=True)
    return caps


def apply_example_caps(cfg: Config) -> Config:
    """``cfg`` with ``epochs`` / ``refine`` lowered to :func:`example_caps` (unchanged if unset)."""
    caps = example_caps()
    for key, cap in caps.items():
        if key in ("epochs", "refine") and getattr(cfg, key) > cap:
            setattr(cfg, key, cap)
    return cfg


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-3`` is a number, not a string.

    PyYAML follows YAML 1.1, whose floats need a dot (``1.0e-3``); JSON and YAML 1.2
    do not, and ``learning_rate: 1e-3`` is how people write it.
    """


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a JSON or YAML config file (or defaults if None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise IstnError(f"config file '{p}' does not exist or is not a file")
        try:
            text = p.read_text()
            data = json.loads(text) if p.suffix == ".json" else yaml.load(text, _Yaml12Loader)
        except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
            raise IstnError(f"config file '{p}' is not valid JSON/YAML: {e}") from None
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise IstnError(f"{source}: expected an object of key: value pairs")
    data = dict(data)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(data, source)

"""Registration of the brain set (:mod:`istn.brain`): istn against SimpleITK, ANTs, elastix.

``python -m istn.bench_brain --data DIR --out DIR [--epochs N] [--skip-istn]
[--transformation T] [--set KEY=VALUE ...]`` registers
every test pair (``DIR/pairs.csv``) and the same pairs with targets stored in other
orientations (``DIR/pairs_reoriented.csv``) with each method, then scores every method's
transform with the same functions:

* Dice GM / WM: the source label map resampled (nearest neighbour) onto the target's grid
  through the method's transform, against the target's label map (labels 1 and 2).
* TRE (mm): ``|T(x_t) - x_s|`` for the corresponding landmarks ``x_t`` (target) and
  ``x_s`` (source); mean, median and 90th percentile over all landmarks of all pairs.
* The row ``truth`` scores the ground-truth transforms: TRE 0, and the Dice that
  nearest-neighbour resampling of the labels leaves at best.
* s/pair: the wall clock of the registration call only (images already in memory;
  for istn one ``istn.register_many`` call over all pairs of the set, model loaded,
  divided by the pairs, see :func:`time_registration`; the whole ``istn register``
  command's wall time per pair is in the JSON).

A nonrigid set (``python -m istn.brain --nonrigid``: ground truth in ``*_transform.h5``;
detected from ``test.transforms.csv``, or forced with ``--nonrigid``) adds the deformable
baselines ANTs SyN (``ants-syn``) and elastix affine + B-spline (``elastix-bspline``)
next to the affine ones, and per deformable method (and ``truth``) the deformation
quality of its whole target -> source map sampled as a displacement field on the
target's grid, over the target's brain voxels (label map > 0), see
:func:`deformation_quality`: ``fold %`` (Jacobian determinant <= 0), ``min J`` and the
standard deviation of log det (in the JSON).

Every transform maps target (fixed) physical points to source (moving) physical points,
as ITK resampling expects (``sitk.Resample(source, target, T)`` warps the source onto
the target).  The methods run on ``--threads`` threads (default 1) for a fair clock.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .data import read_pair_csv
from .errors import IstnError
from .io import write_text

LABELS = {"gm": 1, "wm": 2}
SETS = {"test": "pairs.csv", "reoriented": "pairs_reoriented.csv"}
TRUTH = {"test": "test.transforms.csv", "reoriented": "test_reoriented.transforms.csv"}

# (source path, target path, threads, seed) -> (target -> source transform, seconds)
Method = Callable[[Path, Path, int, int], tuple[sitk.Transform, float]]


# ------------------------------------------------------------------------------- scoring


def warp_labels(labels: sitk.Image, reference: sitk.Image, transform: sitk.Transform
                ) -> np.ndarray:
    """``out(p) = labels(transform(p))`` on ``reference``'s grid (nearest neighbour, 0 outside).

    Returned as a numpy array in SimpleITK order (z, y, x).
    """
    out = sitk.Resample(labels, reference, transform, sitk.sitkNearestNeighbor, 0.0,
                        labels.GetPixelID())
    return sitk.GetArrayFromImage(out)


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    """``2 |A ∩ B| / (|A| + |B|)`` of the voxels equal to ``label``; nan when both are empty."""
    x, y = np.asarray(a) == label, np.asarray(b) == label
    total = int(x.sum()) + int(y.sum())
    return float("nan") if total == 0 else 2.0 * float(np.logical_and(x, y).sum()) / total


def map_points(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """Each physical point (N, 3) through ``transform`` (``TransformPoint``)."""
    return np.array([transform.TransformPoint([float(v) for v in p]) for p in points]
                    ).reshape(-1, 3)


def tre(transform: sitk.Transform, trg_points: np.ndarray, src_points: np.ndarray
        ) -> np.ndarray:
    """Target registration error per landmark: ``|T(x_t) - x_s|`` in mm (T: target -> source)."""
    src_points = np.asarray(src_points, dtype=float)
    if src_points.shape != np.shape(trg_points):
        raise IstnError(f"TRE needs corresponding landmarks; got {np.shape(trg_points)} target "
                        f"and {src_points.shape} source points")
    return np.linalg.norm(map_points(transform, trg_points) - src_points, axis=1)


def summarise(errors: np.ndarray) -> dict[str, float]:
    """mean, median and 90th percentile (numpy's linear interpolation) of the errors."""
    e = np.asarray(errors, dtype=float).ravel()
    return {"mean": float(e.mean()), "median": float(np.median(e)),
            "p90": float(np.percentile(e, 90))}


@dataclass(frozen=True)
class Pair:
    """One test pair's files (paths resolved against the pairs CSV's folder)."""

    src: Path
    trg: Path
    src_labels: Path
    trg_labels: Path
    src_points: Path
    trg_points: Path


def read_pairs(path: Path) -> list[Pair]:
    """Rows of a ``src,trg,src_seg,trg_seg,src_points,trg_points`` CSV (seg = label maps)."""
    if not path.is_file():
        raise IstnError(f"pairs CSV '{path}' does not exist; write the set with "
                        "python -m istn.brain --out DIR")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    keys = ("src", "trg", "src_seg", "trg_seg", "src_points", "trg_points")
    if not rows or any(k not in rows[0] for k in keys):
        raise IstnError(f"pairs CSV '{path}' needs the columns {','.join(keys)}")
    return [Pair(*(path.parent / r[k] for k in keys)) for r in rows]


def score_pair(transform: sitk.Transform, pair: Pair, quality: bool = False
               ) -> dict[str, float]:
    """Dice GM, Dice WM and the landmark errors of one target -> source transform;
    ``quality``: its :func:`deformation_quality` too."""
    from .brain import read_points_csv

    trg_lab = sitk.ReadImage(str(pair.trg_labels))
    warped = warp_labels(sitk.ReadImage(str(pair.src_labels)), trg_lab, transform)
    target = sitk.GetArrayFromImage(trg_lab)
    errors = tre(transform, read_points_csv(pair.trg_points), read_points_csv(pair.src_points))
    out = {"dice_gm": dice(warped, target, LABELS["gm"]),
           "dice_wm": dice(warped, target, LABELS["wm"]), "tre": errors.tolist()}
    if quality:
        out.update(deformation_quality(transform, trg_lab))
    return out


# ------------------------------------------------------------------------------ methods


def as_affine(tx: sitk.Transform) -> sitk.AffineTransform:
    """An affine-like transform (or a composite of one) as a plain ``AffineTransform``."""
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        comp.FlattenTransform()
        if comp.GetNumberOfTransforms() != 1:
            raise IstnError(f"expected one affine transform, got {comp.GetNumberOfTransforms()}")
        tx = comp.GetNthTransform(0)
    return sitk.AffineTransform(tx)


def no_registration(src: Path, trg: Path, threads: int = 1, seed: int = 0
                    ) -> tuple[sitk.Transform, float]:
    """The identity: the images' own physical placement."""
    return sitk.AffineTransform(3), 0.0


def simpleitk_affine(src: Path, trg: Path, threads: int = 1, seed: int = 0
                     ) -> tuple[sitk.Transform, float]:
    """SimpleITK ``ImageRegistrationMethod``: Mattes MI (50 bins, 10 % random samples),
    regular-step gradient descent (step 2 mm down to 1e-4, at most 300 iterations per
    level) with physical-shift scales, 3 levels (shrink 4/2/1, smoothing 2/1/0 voxels),
    affine initialised by ``CenteredTransformInitializer`` (geometry centres)."""
    fixed = sitk.Cast(sitk.ReadImage(str(trg)), sitk.sitkFloat32)
    moving = sitk.Cast(sitk.ReadImage(str(src)), sitk.sitkFloat32)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    t0 = time.perf_counter()
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3),
        sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed + 1)  # seed 0 would mean the wall clock
    reg.SetInterpolator(sitk.sitkLinear)
    # Regular-step descent: plain gradient descent with the usual convergence window
    # stopped after about ten iterations per level here, several mm short of the optimum.
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4,
                                                 numberOfIterations=300, relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()  # voxels (SimpleITK's default: mm)
    reg.SetInitialTransform(init, inPlace=False)
    tx = reg.Execute(fixed, moving)
    return as_affine(tx), time.perf_counter() - t0


def ants_affine(src: Path, trg: Path, threads: int = 1, seed: int = 0
                ) -> tuple[sitk.Transform, float]:
    """``ants.registration(type_of_transform='Affine')`` (its defaults); the forward
    ``GenericAffine.mat`` maps fixed (target) points to moving (source) points."""
    import ants

    fixed, moving = ants.image_read(str(trg)), ants.image_read(str(src))
    with tempfile.TemporaryDirectory(prefix="istn-ants-") as tmp:
        t0 = time.perf_counter()
        res = ants.registration(fixed, moving, type_of_transform="Affine",
                                outprefix=str(Path(tmp) / "reg_"))
        dt = time.perf_counter() - t0
        tx = sitk.ReadTransform(res["fwdtransforms"][0])
    return as_affine(tx), dt


def elastix_affine(src: Path, trg: Path, threads: int = 1, seed: int = 0
                   ) -> tuple[sitk.Transform, float]:
    """itk-elastix with its default 'affine' parameter map; elastix's transform maps fixed
    (target) points to moving (source) points: ``A (x - c) + c + t``."""
    _, result, dt = _elastix(src, trg, ("affine",), threads, seed)
    rmap = result.GetParameterMap(0)
    if rmap["Transform"][0] != "AffineTransform":
        raise IstnError(f"elastix returned a {rmap['Transform'][0]}, expected AffineTransform")
    p = np.array([float(v) for v in rmap["TransformParameters"]])
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(p[:9].tolist())
    tx.SetTranslation(p[9:12].tolist())
    tx.SetCenter([float(v) for v in rmap["CenterOfRotationPoint"]])
    return tx, dt


def _elastix(src: Path, trg: Path, maps: Sequence[str], threads: int, seed: int,
             overrides: dict[str, dict[str, object]] | None = None):
    """Run elastix with its default parameter maps ``maps`` (in order; entries of
    ``overrides[name]`` replace those of map ``name``): (moving image, result parameter
    object, seconds of the registration call)."""
    import itk

    fixed = itk.imread(str(trg), itk.F)
    moving = itk.imread(str(src), itk.F)
    params = itk.ParameterObject.New()
    for name in maps:
        pmap = params.GetDefaultParameterMap(name)
        pmap["RandomSeed"] = [str(seed + 1)]
        pmap["WriteResultImage"] = ["false"]
        for key, value in (overrides or {}).get(name, {}).items():
            pmap[key] = [str(v) for v in (value if isinstance(value, list | tuple)
                                          else [value])]
        params.AddParameterMap(pmap)
    with tempfile.TemporaryDirectory(prefix="istn-elastix-") as tmp:
        t0 = time.perf_counter()
        _, result = itk.elastix_registration_method(
            fixed, moving, parameter_object=params, log_to_console=False,
            output_directory=tmp, number_of_threads=threads)
        dt = time.perf_counter() - t0
    return moving, result, dt


def ants_syn(src: Path, trg: Path, threads: int = 1, seed: int = 0
             ) -> tuple[sitk.Transform, float]:
    """``ants.registration(type_of_transform='SyN')`` (its defaults: an affine stage, then
    SyN). Its forward transforms ``[Warp.nii.gz, GenericAffine.mat]`` map a fixed (target)
    point through the warp first, then the affine (``ants.apply_transforms`` order), so
    the target -> source map is ``sitk.CompositeTransform([affine, warp])`` (SimpleITK
    applies the last transform first)."""
    import ants

    fixed, moving = ants.image_read(str(trg)), ants.image_read(str(src))
    with tempfile.TemporaryDirectory(prefix="istn-ants-") as tmp:
        t0 = time.perf_counter()
        res = ants.registration(fixed, moving, type_of_transform="SyN",
                                outprefix=str(Path(tmp) / "reg_"))
        dt = time.perf_counter() - t0
        files = list(res["fwdtransforms"])
        if len(files) != 2 or not files[0].endswith(".nii.gz") or not files[1].endswith(".mat"):
            raise IstnError(f"ANTs SyN wrote {files}, expected [Warp.nii.gz, GenericAffine.mat]")
        warp = sitk.ReadImage(files[0])
        affine = sitk.ReadTransform(files[1])
    tx = sitk.CompositeTransform([as_affine(affine), _field_transform(warp)])
    return tx, dt


def _field_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    # The constructor takes the image's buffer; the cast hands it a copy.
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def elastix_bspline(src: Path, trg: Path, threads: int = 1, seed: int = 0,
                    bspline: dict[str, object] | None = None
                    ) -> tuple[sitk.Transform, float]:
    """itk-elastix with its default 'affine' then 'bspline' parameter maps (the B-spline
    composed on the affine); the result is sampled by transformix as a displacement
    field on the fixed (target) grid, ``T(p) - p`` with T the fixed -> moving map, and
    returned as a ``DisplacementFieldTransform`` (the field's sampling is not counted in
    the seconds). ``bspline``: entries replacing the B-spline map's (tests only)."""
    import itk

    moving, result, dt = _elastix(src, trg, ("affine", "bspline"), threads, seed,
                                  {"bspline": bspline or {}})
    with tempfile.TemporaryDirectory(prefix="istn-transformix-") as tmp:
        field = itk.transformix_deformation_field(moving, result, log_to_console=False,
                                                  output_directory=tmp)
    arr = np.asarray(itk.array_from_image(field), dtype=np.float64)
    reference = sitk.ReadImage(str(trg))
    if arr.shape != (*reference.GetSize()[::-1], 3):
        raise IstnError(f"transformix returned a field of shape {arr.shape} for a target of "
                        f"size {reference.GetSize()}")
    out = sitk.GetImageFromArray(arr, isVector=True)
    out.CopyInformation(reference)
    return sitk.DisplacementFieldTransform(out), dt


def truth_transform(src_tf: Path, trg_tf: Path) -> sitk.Transform:
    """The ground-truth target -> source map of a pair from its images' transform files
    (:func:`istn.brain.pair_transform`; a non-affine ``*_transform.h5`` uses the
    ``*_inverse.h5`` beside it)."""
    from .brain import pair_transform

    inverse = None
    if Path(src_tf).suffix == ".h5":
        inverse = sitk.ReadTransform(str(src_tf).replace("_transform.h5", "_inverse.h5"))
    return pair_transform(sitk.ReadTransform(str(src_tf)), sitk.ReadTransform(str(trg_tf)),
                          inverse)


# The deformable baselines: (name, module, function), run on nonrigid sets only.
DEFORMABLE = (("ants-syn", "ants", ants_syn), ("elastix-bspline", "itk", elastix_bspline))
BASELINES = ("none", "simpleitk", "ants", "elastix", *(name for name, _, _ in DEFORMABLE))


def available_methods(nonrigid: bool = False) -> tuple[dict[str, Method], dict[str, str]]:
    """The baselines whose packages import here, and why the others are skipped.

    ``nonrigid``: the deformable baselines too (after the affine ones, the lower bar).
    """
    methods: dict[str, Method] = {"none": no_registration, "simpleitk": simpleitk_affine}
    skipped = {}
    candidates = [("ants", "ants", ants_affine), ("elastix", "itk", elastix_affine)]
    for name, module, fn in candidates + (list(DEFORMABLE) if nonrigid else []):
        if importlib.util.find_spec(module) is None:
            skipped[name] = f"{module} is not installed (pip install istn[compare])"
        else:
            methods[name] = fn
    return methods, skipped


def is_nonrigid(data: Path) -> bool:
    """Whether the set's ground truth is deformable (``istn.brain --nonrigid`` writes
    ``*_transform.h5`` files, the affine set ``*_transform.tfm``)."""
    rows = read_pair_csv(Path(data) / TRUTH["test"], "transforms")
    return any(str(p).endswith(".h5") for pair in rows for p in pair)


# ------------------------------------------------------------------ deformation quality


def displacement_on(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """``T(p) - p`` at every voxel centre of ``reference`` (vector float64 image)."""
    return sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(),
        reference.GetSpacing(), reference.GetDirection())


def deformation_quality(transform: sitk.Transform, target_labels: sitk.Image
                        ) -> dict[str, float]:
    """Jacobian determinant of the whole target -> source map over the target's brain.

    The map is sampled as a displacement field on the label map's grid
    (:func:`displacement_on`); the determinant ``det(I + dd/dp)`` in physical units
    (:func:`istn.export.jacobian_determinant`: central differences, direction and
    spacing respected) is taken at the voxels with label > 0. Returns ``fold_percent``
    (% of those voxels with det <= 0), ``jacobian_min`` and ``log_jacobian_std`` (over
    the voxels with det > 0). An affine map has one determinant everywhere (std 0).
    """
    from .export import jacobian_determinant

    det = jacobian_determinant(displacement_on(transform, target_labels))
    brain = sitk.GetArrayFromImage(target_labels) > 0
    if not brain.any():
        raise IstnError("the target label map has no brain voxels (label > 0)")
    d = det[brain]
    positive = d[d > 0]
    return {"fold_percent": float(100.0 * (d <= 0).mean()), "jacobian_min": float(d.min()),
            "log_jacobian_std": float(np.log(positive).std()) if positive.size else
            float("nan")}


# ---------------------------------------------------------------------------------- istn


def _run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise IstnError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                        f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def istn_transforms(reg_dir: Path, n: int) -> list[sitk.Transform]:
    """The transform of each pair folder ``NNNN_<name>`` that ``istn register --pairs``
    writes (target -> source, physical): ``transform.tfm`` (affine models, as a plain
    ``AffineTransform``), else ``transform.h5`` (every model; non-linear ones)."""
    out = []
    for i in range(n):
        found = sorted(reg_dir.glob(f"{i:04d}_*/transform.tfm"))
        if not found:
            h5 = sorted(reg_dir.glob(f"{i:04d}_*/transform.h5"))
            if len(h5) == 1:
                out.append(sitk.ReadTransform(str(h5[0])))
                continue
        if len(found) != 1:
            raise IstnError(f"expected one {reg_dir}/{i:04d}_*/transform.tfm (or transform.h5), "
                            f"found {len(found)}")
        out.append(as_affine(sitk.ReadTransform(str(found[0]))))
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings as config overrides; a VALUE that parses as JSON (numbers,
    true/false/null, lists) is taken as such, any other as a string."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise IstnError(f"--set needs KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def istn_config(data: Path, out: Path, overrides: dict[str, object]) -> Path:
    """The set's ``config.json`` with ``overrides`` applied (checked by
    :func:`istn.config.load_config`), written to ``out/istn_config.json``."""
    from .config import load_config

    base = json.loads((data / "config.json").read_text())
    load_config(data / "config.json", dict(overrides))  # unknown keys / bad values: IstnError
    path = out / "istn_config.json"
    write_text(json.dumps({**base, **overrides}, indent=2) + "\n", path)
    return path


def run_istn(data: Path, out: Path, epochs: int, threads: int, seed: int,
             transformation: str = "affine", overrides: dict[str, object] | None = None,
             sets: Sequence[str] = tuple(SETS), model: Path | None = None
             ) -> tuple[dict[str, dict[str, list[sitk.Transform]]], dict[str, dict],
                        float | None]:
    """Train ISTN-i (``transformation``, the set's config with ``overrides``) through the
    command line, then register the test sets ``sets`` (default both).

    Returns per set the transforms of ``istn`` (those ``istn register`` wrote, with the
    config's refinement) and of ``istn-network`` (the networks' prediction alone,
    ``refine`` 0); per set the timings (:func:`time_registration`'s seconds per pair of
    both, the command's wall time / pairs, and the largest distance between the
    command's transforms and the timed call's); and the training seconds. With ``model``
    (a trained model folder) nothing is trained (training seconds None).
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    exe = [sys.executable, "-m", "istn"]
    if model is not None:
        train_s = None
    else:
        model = out / "istn" / "train" / "model"
        config = istn_config(data, out, overrides or {})
        train_s = _run([*exe, "train", "--config", str(config), "--loss", "i",
                    "--transformation", transformation, "--train", str(data / "train.csv"),
                        "--train_seg", str(data / "train.seg.csv"), "--out",
                        str(out / "istn"), "--epochs", str(epochs), "--seed", str(seed),
                        "--overwrite", "--quiet"], env)
    transforms, timing = {}, {}
    for name in sets:
        pairs_csv = data / SETS[name]
        pairs = read_pairs(pairs_csv)
        reg = out / ("istn_reg" if name == "test" else f"istn_reg_{name}")
        wall = _run([*exe, "register", "--model", str(model), "--pairs", str(pairs_csv),
                     "--out", str(reg), "--overwrite", "--quiet"], env)
        written = istn_transforms(reg, len(pairs))
        per_pair, again = time_registration(model, pairs, threads)
        net_per_pair, network = time_registration(model, pairs, threads, refine=0)
        transforms[name] = {"istn": written, "istn-network": network}
        timing[name] = {"seconds_per_pair": per_pair, "network_seconds_per_pair": net_per_pair,
                        "command_seconds_per_pair": wall / len(pairs),
                        "max_difference_mm": max(
                            largest_difference(a, b, p.trg)
                            for a, b, p in zip(written, again, pairs, strict=True))}
    return transforms, timing, train_s


def time_registration(model_dir: Path, pairs: Sequence[Pair], threads: int,
                      refine: int | None = None) -> tuple[float, list[sitk.Transform]]:
    """Seconds per pair of istn's registration call, timed as the baselines' are: the
    model loaded and the images read first, then all pairs registered in one call of
    ``istn.register_many(..., refine, warp=False)`` (networks and refinement, batched;
    ``refine`` None: the config's iterations) on ``threads`` threads; and the
    transforms it found."""
    import torch

    from . import api

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    model = api.load_model(model_dir)
    images = [(sitk.ReadImage(str(p.src)), sitk.ReadImage(str(p.trg))) for p in pairs]
    t0 = time.perf_counter()
    regs = api.register_many(model, images, refine, warp=False)
    return (time.perf_counter() - t0) / len(pairs), [r.transform for r in regs]


def largest_difference(a: sitk.Transform, b: sitk.Transform, image: Path) -> float:
    """The largest distance (mm) between ``a`` and ``b`` at the corners of ``image``."""
    ref = sitk.ReadImage(str(image))
    corners = [ref.TransformContinuousIndexToPhysicalPoint(
        [(-0.5 if c == "0" else n - 0.5) for c, n in zip(code, ref.GetSize(), strict=True)])
        for code in (f"{i:03b}" for i in range(8))]
    return max(float(np.linalg.norm(np.subtract(a.TransformPoint(p), b.TransformPoint(p))))
               for p in corners)


# ------------------------------------------------------------------------------- report


def aggregate(rows: list[dict]) -> dict[str, float]:
    """Mean Dice per tissue over pairs, TRE statistics over all landmarks, mean s/pair."""
    errors = np.concatenate([np.asarray(r["tre"]) for r in rows])
    out = {"dice_gm": float(np.nanmean([r["dice_gm"] for r in rows])),
           "dice_wm": float(np.nanmean([r["dice_wm"] for r in rows])),
           **{f"tre_{k}": v for k, v in summarise(errors).items()},
           "seconds_per_pair": float(np.mean([r["seconds"] for r in rows])),
           "pairs": len(rows)}
    if all("fold_percent" in r for r in rows):
        # fold %: the mean over pairs; min J: the smallest of any pair
        out["fold_percent"] = float(np.mean([r["fold_percent"] for r in rows]))
        out["fold_percent_max"] = float(np.max([r["fold_percent"] for r in rows]))
        out["jacobian_min"] = float(np.min([r["jacobian_min"] for r in rows]))
        out["log_jacobian_std"] = float(np.nanmean([r["log_jacobian_std"] for r in rows]))
    return out


CLASSICAL_AFFINE = ("simpleitk", "ants", "elastix")


def speed_ratios(summary: dict[str, dict[str, dict]]) -> dict[str, tuple[str, float, float]]:
    """Per set: the fastest classical affine baseline of the run, its seconds per pair
    and istn's seconds per pair divided by them (sets without istn or baselines: none)."""
    out = {}
    for set_name, rows in summary.items():
        classical = {m: rows[m]["seconds_per_pair"] for m in CLASSICAL_AFFINE if m in rows}
        if "istn" not in rows or not classical:
            continue
        fastest = min(classical, key=classical.get)
        out[set_name] = (fastest, classical[fastest],
                         rows["istn"]["seconds_per_pair"] / classical[fastest])
    return out


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    """One row per (set, method): Dice GM, Dice WM, TRE mean/median/p90 (mm), s/pair;
    when any method has deformation figures also ``fold %`` (mean over pairs, 4
    decimals) and ``min J`` (the smallest of any pair), ``-`` for methods without."""
    deformable = any("fold_percent" in s for ms in results.values() for s in ms.values())
    head = "| set | method | Dice GM | Dice WM | TRE mean | TRE median | TRE p90 | s/pair |"
    lines = [head + (" fold % | min J |" if deformable else ""),
             "| --- " * (10 if deformable else 8) + "|"]
    for set_name, methods in results.items():
        for name, s in methods.items():
            row = (f"| {set_name} | {name} | {s['dice_gm']:.3f} | {s['dice_wm']:.3f} | "
                   f"{s['tre_mean']:.2f} | {s['tre_median']:.2f} | {s['tre_p90']:.2f} | "
                   f"{s['seconds_per_pair']:.1f} |")
            if deformable:
                row += (f" {s['fold_percent']:.4f} | {s['jacobian_min']:.3f} |"
                        if "fold_percent" in s else " - | - |")
            lines.append(row)
    return "\n".join(lines) + "\n"


def run_benchmark(data: Path, out: Path, epochs: int = 10, skip_istn: bool = False,
                  threads: int = 1, seed: int = 0, limit: int | None = None,
                  nonrigid: bool | None = None, transformation: str = "affine",
                  overrides: dict[str, object] | None = None,
                  sets: Sequence[str] | None = None,
                  baselines: Sequence[str] | None = None, model: Path | None = None) -> dict:
    """Register and score every set with every available method; write bench_brain.json.

    ``nonrigid``: add the deformable baselines and the deformation quality (None: when
    the set's ground truth is deformable, :func:`is_nonrigid`). ``transformation`` and
    ``overrides`` (config keys) go to ``istn train``. ``sets``: a subset of ``test``,
    ``reoriented`` (default both). ``baselines``: the baselines to run, of
    :data:`BASELINES` (default every one that applies and is installed). ``model``: score
    this trained istn model (its own config and transformation) instead of training one.
    """
    data, out = Path(data), Path(out)
    overrides = dict(overrides or {})
    out.mkdir(parents=True, exist_ok=True)
    nonrigid = is_nonrigid(data) if nonrigid is None else bool(nonrigid)
    names = list(SETS) if sets is None else list(sets)
    unknown = [n for n in names if n not in SETS]
    if unknown or not names:
        raise IstnError(f"unknown set {unknown or names}; choose from {', '.join(SETS)}")
    if model is not None:
        if overrides:
            raise IstnError("--set changes training; with --model the model's own config "
                            "is used: leave --set out or train a new model")
        from .api import load_model
        meta = load_model(model)  # IstnError naming the folder if it is no model
        transformation, epochs = meta.transformation, meta.cfg.epochs
    if not skip_istn and limit is not None:
        raise IstnError("--limit cannot be combined with istn (it registers whole CSVs)")
    if not skip_istn and model is None:
        istn_config(data, out, overrides)  # a bad --set fails before the baselines run
    wanted = list(BASELINES) if baselines is None else list(baselines)
    unknown = [m for m in wanted if m not in BASELINES]
    if unknown:
        raise IstnError(f"unknown baseline {unknown}; choose from {', '.join(BASELINES)}")
    methods, skipped = available_methods(nonrigid)
    for name in [m for m in methods if m not in wanted]:
        del methods[name]
        skipped[name] = "not in --baselines"
    deformable = {name for name, _, _ in DEFORMABLE}
    sets_ = {name: read_pairs(data / SETS[name])[:limit] for name in names}
    per_pair: dict[str, dict[str, list[dict]]] = {name: {} for name in sets_}
    for set_name, pairs in sets_.items():
        # The ground truth scored the same way: the ceiling the label resampling leaves.
        truth = read_pair_csv(data / TRUTH[set_name], "transforms")[: len(pairs)]
        per_pair[set_name]["truth"] = [
            {**score_pair(truth_transform(s, t), pair, nonrigid), "seconds": 0.0,
             "source": str(pair.src), "target": str(pair.trg)}
            for (s, t), pair in zip(truth, pairs, strict=True)]
        for name, method in methods.items():
            rows = []
            for pair in pairs:
                tx, seconds = method(pair.src, pair.trg, threads, seed)
                rows.append({**score_pair(tx, pair, name in deformable), "seconds": seconds,
                             "source": str(pair.src), "target": str(pair.trg)})
            per_pair[set_name][name] = rows
            print(f"{set_name}: {name} done", flush=True)
    istn_info = None
    if skip_istn:
        skipped["istn"] = "--skip-istn"
    else:
        transforms, timing, train_s = run_istn(data, out, epochs, threads, seed,
                                               transformation, overrides, names, model)
        linear = transformation == "affine"
        for set_name, pairs in sets_.items():
            for name, key in (("istn-network", "network_seconds_per_pair"),
                              ("istn", "seconds_per_pair")):
                per_pair[set_name][name] = [
                    {**score_pair(tx, pair, nonrigid and not linear),
                     "seconds": timing[set_name][key], "source": str(pair.src),
                     "target": str(pair.trg)}
                    for tx, pair in zip(transforms[set_name][name], pairs, strict=True)]
        istn_info = {"epochs": epochs, "transformation": transformation,
                     "model": None if model is None else str(model),
                     "overrides": overrides, "train_seconds": train_s, "timing": timing,
                     "seconds_per_pair": "one istn.register_many(warp=False) call over the "
                     "set's pairs (model loaded, images read) / pairs; "
                     "command_seconds_per_pair: the whole istn register command / pairs"}
    summary = {s: {m: aggregate(rows) for m, rows in ms.items()} for s, ms in per_pair.items()}
    report = {"data": str(data), "threads": threads, "seed": seed, "nonrigid": nonrigid,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
              + f", {os.cpu_count()} CPUs", "skipped": skipped, "istn": istn_info,
              "summary": summary, "pairs": per_pair}
    write_text(json.dumps(report, indent=1) + "\n", out / "bench_brain.json")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m istn.bench_brain --data DIR --out DIR [--epochs N] [--skip-istn] ...``."""
    from .spatial import TRANSFORMATIONS

    p = argparse.ArgumentParser(prog="python -m istn.bench_brain",
                                description="brain MRI benchmark: istn, SimpleITK, ANTs, "
                                "elastix on the istn.brain set (affine; on a nonrigid set "
                                "also ANTs SyN and elastix B-spline)")
    p.add_argument("--data", required=True, help="folder written by python -m istn.brain")
    p.add_argument("--out", required=True, help="output folder (bench_brain.json)")
    p.add_argument("--epochs", type=int, default=10, help="istn training epochs (default 10)")
    p.add_argument("--skip-istn", dest="skip_istn", action="store_true")
    p.add_argument("--model", type=Path, default=None,
                   help="score this trained istn model folder (its own config and "
                   "transformation) instead of training one")
    p.add_argument("--transformation", choices=list(TRANSFORMATIONS), default="affine",
                   help="istn's transformation model (default affine)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a key of the set's config.json for "
                   "istn train (repeatable; VALUE as JSON where it parses, e.g. "
                   "--set refine=200 --set refine_mode=params)")
    p.add_argument("--nonrigid", action=argparse.BooleanOptionalAction, default=None,
                   help="deformable baselines and folding figures (default: when the set's "
                   "ground truth is deformable, *_transform.h5)")
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=None,
                   help="the test sets to register (default both)")
    p.add_argument("--baselines", nargs="+", choices=list(BASELINES), default=None,
                   help="the baselines to run (default all that apply and are installed; "
                   "e.g. --baselines none for an istn-only run)")
    p.add_argument("--threads", type=int, default=1, help="threads per method (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N pairs per set only "
                   "(baselines; not with istn)")
    args = p.parse_args(argv)
    # ITK in ANTs and elastix reads its thread count from the environment.
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    os.environ.setdefault("ANTS_RANDOM_SEED", str(args.seed + 1))
    try:
        report = run_benchmark(Path(args.data), Path(args.out), args.epochs, args.skip_istn,
                               args.threads, args.seed, args.limit, args.nonrigid,
                               args.transformation, parse_overrides(args.overrides),
                               args.sets, args.baselines, args.model)
    except IstnError as e:
        print(f"error: {e}")
        return 2
    print(markdown_table(report["summary"]), end="")
    for set_name, t in ((report["istn"] or {}).get("timing") or {}).items():
        print(f"istn {set_name}: {t['seconds_per_pair']:.2f} s/pair in one register_many "
              f"call, {t['command_seconds_per_pair']:.2f} s/pair for the whole istn register "
              f"command; their transforms differ by at most {t['max_difference_mm']:.2g} mm")
    for set_name, (name, seconds, ratio) in speed_ratios(report["summary"]).items():
        print(f"istn {set_name}: {ratio:.2f} times the seconds per pair of the fastest "
              f"classical affine, {name} ({seconds:.2f} s/pair)")
    for name, why in report["skipped"].items():
        print(f"skipped {name}: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

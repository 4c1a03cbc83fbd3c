"""Affine registration of the brain set (:mod:`istn.brain`): istn against SimpleITK, ANTs, elastix.

``python -m istn.bench_brain --data DIR --out DIR [--epochs N] [--skip-istn]`` registers
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
  for istn, the wall time of the whole ``istn register`` command divided by the pairs).

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


def score_pair(transform: sitk.Transform, pair: Pair) -> dict[str, float]:
    """Dice GM, Dice WM and the landmark errors of one target -> source transform."""
    from .brain import read_points_csv

    trg_lab = sitk.ReadImage(str(pair.trg_labels))
    warped = warp_labels(sitk.ReadImage(str(pair.src_labels)), trg_lab, transform)
    target = sitk.GetArrayFromImage(trg_lab)
    errors = tre(transform, read_points_csv(pair.trg_points), read_points_csv(pair.src_points))
    return {"dice_gm": dice(warped, target, LABELS["gm"]),
            "dice_wm": dice(warped, target, LABELS["wm"]), "tre": errors.tolist()}


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
    import itk

    fixed = itk.imread(str(trg), itk.F)
    moving = itk.imread(str(src), itk.F)
    params = itk.ParameterObject.New()
    pmap = params.GetDefaultParameterMap("affine")
    pmap["RandomSeed"] = [str(seed + 1)]
    pmap["WriteResultImage"] = ["false"]
    params.AddParameterMap(pmap)
    with tempfile.TemporaryDirectory(prefix="istn-elastix-") as tmp:
        t0 = time.perf_counter()
        _, result = itk.elastix_registration_method(
            fixed, moving, parameter_object=params, log_to_console=False,
            output_directory=tmp, number_of_threads=threads)
        dt = time.perf_counter() - t0
    rmap = result.GetParameterMap(0)
    if rmap["Transform"][0] != "AffineTransform":
        raise IstnError(f"elastix returned a {rmap['Transform'][0]}, expected AffineTransform")
    p = np.array([float(v) for v in rmap["TransformParameters"]])
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(p[:9].tolist())
    tx.SetTranslation(p[9:12].tolist())
    tx.SetCenter([float(v) for v in rmap["CenterOfRotationPoint"]])
    return tx, dt


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


def available_methods() -> tuple[dict[str, Method], dict[str, str]]:
    """The baselines whose packages import here, and why the others are skipped."""
    methods: dict[str, Method] = {"none": no_registration, "simpleitk": simpleitk_affine}
    skipped = {}
    for name, module, fn in (("ants", "ants", ants_affine), ("elastix", "itk", elastix_affine)):
        if importlib.util.find_spec(module) is None:
            skipped[name] = f"{module} is not installed (pip install istn[compare])"
        else:
            methods[name] = fn
    return methods, skipped


# ---------------------------------------------------------------------------------- istn


def _run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise IstnError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                        f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def istn_transforms(reg_dir: Path, n: int) -> list[sitk.Transform]:
    """The ``transform.tfm`` of each pair folder ``NNNN_<name>`` that ``istn register
    --pairs`` writes (target -> source, physical)."""
    out = []
    for i in range(n):
        found = sorted(reg_dir.glob(f"{i:04d}_*/transform.tfm"))
        if len(found) != 1:
            raise IstnError(f"expected one {reg_dir}/{i:04d}_*/transform.tfm, found {len(found)}")
        out.append(as_affine(sitk.ReadTransform(str(found[0]))))
    return out


def run_istn(data: Path, out: Path, epochs: int, threads: int, seed: int
             ) -> tuple[dict[str, list[sitk.Transform]], dict[str, float], float]:
    """Train ISTN-i affine through the command line, then register both test sets.

    Returns the transforms per set, the seconds per pair per set (the register command's
    wall time / pairs, model loading and file writing included) and the training seconds.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    exe = [sys.executable, "-m", "istn"]
    train_s = _run([*exe, "train", "--config", str(data / "config.json"), "--loss", "i",
                    "--transformation", "affine", "--train", str(data / "train.csv"),
                    "--train_seg", str(data / "train.seg.csv"), "--out", str(out / "istn"),
                    "--epochs", str(epochs), "--seed", str(seed), "--overwrite", "--quiet"], env)
    transforms, seconds = {}, {}
    for name, csv_name in SETS.items():
        pairs_csv = data / csv_name
        n = len(read_pairs(pairs_csv))
        reg = out / ("istn_reg" if name == "test" else f"istn_reg_{name}")
        wall = _run([*exe, "register", "--model", str(out / "istn" / "train" / "model"),
                     "--pairs", str(pairs_csv), "--out", str(reg), "--overwrite", "--quiet"],
                    env)
        transforms[name] = istn_transforms(reg, n)
        seconds[name] = wall / n
    return transforms, seconds, train_s


# ------------------------------------------------------------------------------- report


def aggregate(rows: list[dict]) -> dict[str, float]:
    """Mean Dice per tissue over pairs, TRE statistics over all landmarks, mean s/pair."""
    errors = np.concatenate([np.asarray(r["tre"]) for r in rows])
    return {"dice_gm": float(np.nanmean([r["dice_gm"] for r in rows])),
            "dice_wm": float(np.nanmean([r["dice_wm"] for r in rows])),
            **{f"tre_{k}": v for k, v in summarise(errors).items()},
            "seconds_per_pair": float(np.mean([r["seconds"] for r in rows])),
            "pairs": len(rows)}


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    """One row per (set, method): Dice GM, Dice WM, TRE mean/median/p90 (mm), s/pair."""
    lines = ["| set | method | Dice GM | Dice WM | TRE mean | TRE median | TRE p90 | s/pair |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for set_name, methods in results.items():
        for name, s in methods.items():
            lines.append(f"| {set_name} | {name} | {s['dice_gm']:.3f} | {s['dice_wm']:.3f} | "
                         f"{s['tre_mean']:.2f} | {s['tre_median']:.2f} | {s['tre_p90']:.2f} | "
                         f"{s['seconds_per_pair']:.1f} |")
    return "\n".join(lines) + "\n"


def run_benchmark(data: Path, out: Path, epochs: int = 10, skip_istn: bool = False,
                  threads: int = 1, seed: int = 0, limit: int | None = None) -> dict:
    """Register and score every set with every available method; write bench_brain.json."""
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods, skipped = available_methods()
    sets = {name: read_pairs(data / csv_name)[:limit] for name, csv_name in SETS.items()}
    per_pair: dict[str, dict[str, list[dict]]] = {name: {} for name in sets}
    for set_name, pairs in sets.items():
        # The ground truth scored the same way: the ceiling the label resampling leaves.
        truth = read_pair_csv(data / TRUTH[set_name], "transforms")[: len(pairs)]
        per_pair[set_name]["truth"] = [
            {**score_pair(truth_transform(s, t), pair), "seconds": 0.0,
             "source": str(pair.src), "target": str(pair.trg)}
            for (s, t), pair in zip(truth, pairs, strict=True)]
        for name, method in methods.items():
            rows = []
            for pair in pairs:
                tx, seconds = method(pair.src, pair.trg, threads, seed)
                rows.append({**score_pair(tx, pair), "seconds": seconds,
                             "source": str(pair.src), "target": str(pair.trg)})
            per_pair[set_name][name] = rows
            print(f"{set_name}: {name} done", flush=True)
    istn_info = None
    if skip_istn:
        skipped["istn"] = "--skip-istn"
    else:
        if limit is not None:
            raise IstnError("--limit cannot be combined with istn (it registers whole CSVs)")
        transforms, seconds, train_s = run_istn(data, out, epochs, threads, seed)
        for set_name, pairs in sets.items():
            per_pair[set_name]["istn"] = [
                {**score_pair(tx, pair), "seconds": seconds[set_name],
                 "source": str(pair.src), "target": str(pair.trg)}
                for tx, pair in zip(transforms[set_name], pairs, strict=True)]
        istn_info = {"epochs": epochs, "train_seconds": train_s,
                     "seconds_per_pair": "istn register wall time / pairs (whole command)"}
    summary = {s: {m: aggregate(rows) for m, rows in ms.items()} for s, ms in per_pair.items()}
    report = {"data": str(data), "threads": threads, "seed": seed,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
              + f", {os.cpu_count()} CPUs", "skipped": skipped, "istn": istn_info,
              "summary": summary, "pairs": per_pair}
    write_text(json.dumps(report, indent=1) + "\n", out / "bench_brain.json")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m istn.bench_brain --data DIR --out DIR [--epochs N] [--skip-istn]``."""
    p = argparse.ArgumentParser(prog="python -m istn.bench_brain",
                                description="affine brain MRI benchmark: istn, SimpleITK, "
                                "ANTs, elastix on the istn.brain set")
    p.add_argument("--data", required=True, help="folder written by python -m istn.brain")
    p.add_argument("--out", required=True, help="output folder (bench_brain.json)")
    p.add_argument("--epochs", type=int, default=10, help="istn training epochs (default 10)")
    p.add_argument("--skip-istn", dest="skip_istn", action="store_true")
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
                               args.threads, args.seed, args.limit)
    except IstnError as e:
        print(f"error: {e}")
        return 2
    print(markdown_table(report["summary"]), end="")
    for name, why in report["skipped"].items():
        print(f"skipped {name}: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

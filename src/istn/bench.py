"""Performance benchmark: ``python -m istn.bench [--out DIR] [--quick] [--device cpu|cuda]``.

Measures on the current machine, for ISTN-i with an affine and a B-spline STN, on
synthetic data from :func:`istn.synth.generate` (2D: 128x128, batch 10, 100 training
pairs; 3D: 64^3, batch 2, 20 training pairs):

* training: seconds per epoch and pairs per second of the real training step
  (``Model`` + Adam + :func:`istn.engine.train.backward_step`, step) over
  shuffled batches, timed for a few epochs after one warm-up batch;
* testing: milliseconds per pair of :func:`istn.engine.evaluate.predict` alone (no
  metrics), and of :func:`istn.engine.evaluate.evaluate` without refinement
  (prediction, warping and every metric) for the comparison with the published code;
* refinement (50 iterations): seconds per pair refining one pair at a time
  (``refine(..., chunk=1)``) and all test pairs together (``chunk=0``), in the
  default ``refine_mode`` 'weights' and in 'params';
* peak memory: the resident set size (``ru_maxrss``) of a fresh process per
  configuration (so the peaks of different configurations never mix; the figure
  includes the interpreter, PyTorch and the loaded data, ``baseline_rss_mb`` is the
  process after imports) and ``torch.cuda.max_memory_allocated`` on a GPU;
* a classical baseline on the same 2D test pairs: SimpleITK affine registration,
  seconds per pair and Dice, next to istn's seconds per pair and Dice of a model
  trained briefly in the same run (the Dice values only place the timings in context);
* the achieved fraction of the machine's compute: FLOPs of one 2D affine ISTN-i
  training step counted with ``FlopCounterMode`` (convolutions and matrix products,
  forward and backward; sampling and element-wise operations are not counted) over
  the measured step time, against the better of a float32 matmul and a convolution.

Test pairs: 8 (2D) and 2 (3D); the classical comparison uses the 2D affine model trained
for 10 epochs. ``--quick`` (CI smoke test): 20 pairs 2D, 2 pairs of 40^3 3D, 1 timed
epoch, 3 refinement iterations; the comparison with the published figures is then scaled
to 100 pairs and 50 iterations.

Every configuration runs in its own subprocess (``--worker``, internal) with the default
PyTorch threads; the environment (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``) is passed on and
recorded. On a CPU shared with other jobs, spinning OpenMP threads can make istn many times
slower (a probe compares a small convolution with the default threads and with one thread
and the report warns); ``OMP_WAIT_POLICY=PASSIVE`` avoids that. The data are generated into
a temporary folder that is removed at the end. Results are printed and written to
``OUT/bench.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import layout
from .io import write_text

# Figures of the published research code (Lee et al.'s ISTN implementation), measured on
# this project's reference machine kind: 2 CPU cores, no GPU, synthetic 2D data, ISTN-i
# with the affine STN, published config (128x128, batch 10, 100 training pairs).
PUBLISHED_TRAIN_S_PER_EPOCH = 3.75  # seconds per training epoch (100 pairs, batch 10)
PUBLISHED_TEST_MS_PER_PAIR = 26.0  # ms per test pair, prediction + metrics
PUBLISHED_REFINE_S_PER_PAIR = 2.0  # s per test pair, 50 refinement iterations, one at a time
PUBLISHED_PAIRS = 100
PUBLISHED_REFINE_ITERATIONS = 50

# Sizes of the full and the --quick benchmark. size: (x, y[, z]) voxels.
PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "2d": {"size": [128, 128], "train": 100, "test": 8, "batch": 10},
        "3d": {"size": [64, 64, 64], "train": 20, "test": 2, "batch": 2},
        "epochs": 2,  # timed training epochs per configuration (after one warm-up batch)
        "refine": 50,  # refinement iterations
        "brief_epochs": 10,  # epochs of the model behind the classical comparison
        "predict_pairs": 20,  # at least this many predictions timed (test set repeated)
    },
    "quick": {
        "2d": {"size": [128, 128], "train": 20, "test": 2, "batch": 10},
        "3d": {"size": [40, 40, 40], "train": 2, "test": 2, "batch": 2},
        "epochs": 1,
        "refine": 3,
        "brief_epochs": 2,
        "predict_pairs": 4,
    },
}
CONFIGS = (("2d", "affine"), ("2d", "bspline"), ("3d", "affine"), ("3d", "bspline"))
SEED = 0


# ----------------------------------------------------------------------------- helpers


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss: KiB; bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(device):
    _sync(device)
    return time.perf_counter()


def _log(msg: str) -> None:
    print(msg, flush=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _describe_device(device_name: str) -> str:
    import torch

    threads = torch.get_num_threads()
    if device_name == "cuda":
        return (f"cuda: {torch.cuda.get_device_name(0)} (torch {torch.__version__}; "
                f"host {os.cpu_count()} logical cores)")
    return (f"cpu: {_cpu_name()} ({os.cpu_count()} logical cores, {threads} torch threads, "
            f"torch {torch.__version__})")


# ----------------------------------------------------------------------------- worker


def _gather(ps, idx, device) -> dict:
    get = lambda t: t[idx].to(device) if t is not None else None  # noqa: E731
    return {k: get(getattr(ps, k)) for k in ("src", "trg", "src_seg", "trg_seg")}


def _train_epochs(model, opt, ps, device, epochs: int, gen) -> list[float]:
    """Run ``epochs`` epochs of the engine's training step; seconds per epoch."""
    import torch

    from .engine.train import backward_step

    n, bs = len(ps), model.cfg.batch_size
    model.train(True)
    times = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        t0 = _timer(device)
        for b in range(0, n, bs):
            loss, _ = backward_step(model, opt, _gather(ps, order[b:b + bs], device))
            if not torch.isfinite(loss):
                raise RuntimeError(f"training diverged (loss {loss.item()})")
            opt.step()
        times.append(_timer(device) - t0)
    return times


def _time_refine(model, s_p, t_p, iterations: int, mode: str, chunk: int, device) -> float:
    from dataclasses import replace

    from .engine.refine import RefineSettings, refine

    settings = replace(RefineSettings.from_config(model.cfg, iterations), mode=mode, chunk=chunk)
    t0 = _timer(device)
    refine(model, s_p, t_p, settings, progress=False)
    return _timer(device) - t0


def _mean_dice(warped_seg, trg_seg, spacing) -> float:
    import numpy as np

    from .metrics import overlap_metrics

    vals = [overlap_metrics(warped_seg[i, 0].numpy(), trg_seg[i, 0].numpy(), spacing)["dice"]
            for i in range(len(trg_seg))]
    return float(np.nanmean(vals))


def _simpleitk_affine(fixed_arr, moving_arr, moving_seg_arr, spacing):
    """Classical affine registration of moving onto fixed; returns the warped moving SoI."""
    import numpy as np
    import SimpleITK as sitk

    def image(a):
        img = sitk.GetImageFromArray(np.asarray(a, dtype=np.float32))
        img.SetSpacing([float(s) for s in spacing])
        return img

    fixed, moving, moving_seg = image(fixed_arr), image(moving_arr), image(moving_seg_arr)
    dim = fixed.GetDimension()
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(dim),
        sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=200,
        gradientMagnitudeTolerance=1e-8, relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(init, inPlace=False)
    tx = reg.Execute(fixed, moving)
    warped = sitk.Resample(moving_seg, fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(warped)


SIMPLEITK_SETTINGS = ("AffineTransform, CenteredTransformInitializer (GEOMETRY), mean squares "
                      "(all voxels), linear interpolation, regular step gradient descent "
                      "(lr 1, min step 1e-4, <=200 iterations/level, scales from physical "
                      "shift), 3 levels: shrink 4/2/1, smoothing sigma 2/1/0")


def _classical(model, opt, train_set, test_set, device, spec, epochs_done: int, gen) -> dict:
    """Brief extra training, then istn vs SimpleITK on the same test pairs."""
    import numpy as np
    import torch

    from .engine.evaluate import apply, predict
    from .engine.refine import RefineSettings, refine

    cfg = model.cfg
    extra = max(0, spec["brief_epochs"] - epochs_done)
    t0 = time.perf_counter()
    _train_epochs(model, opt, train_set, device, extra, gen)
    _log(f"    classical: trained {extra} more epochs ({time.perf_counter() - t0:.1f} s)")
    n = len(test_set)
    spacing = cfg.spacing
    src, trg = test_set.src.to(device), test_set.trg.to(device)
    t0 = _timer(device)
    params, s_p, t_p = predict(model, src, trg)
    t_predict = _timer(device) - t0
    iters = spec["refine"]
    t0 = _timer(device)
    refined = refine(model, s_p, t_p, RefineSettings.from_config(cfg, iters), progress=False)
    t_refine = _timer(device) - t0
    dice_pred = _mean_dice(apply(model, params, test_set, None).seg, test_set.trg_seg, spacing)
    dice_ref = _mean_dice(apply(model, refined, test_set, None).seg, test_set.trg_seg, spacing)
    dice_id = _mean_dice(test_set.src_seg, test_set.trg_seg, spacing)

    t0 = time.perf_counter()
    warped = []
    for i in range(n):
        warped.append(_simpleitk_affine(test_set.trg[i, 0].numpy(), test_set.src[i, 0].numpy(),
                                        test_set.src_seg[i, 0].numpy(), spacing))
    t_sitk = time.perf_counter() - t0
    sitk_dice = _mean_dice(torch.from_numpy(np.stack(warped))[:, None],
                           test_set.trg_seg, spacing)
    return {
        "pairs": n,
        "simpleitk_s_per_pair": t_sitk / n,
        "simpleitk_dice": sitk_dice,
        "simpleitk_settings": SIMPLEITK_SETTINGS,
        "istn_s_per_pair_predict": t_predict / n,
        "istn_s_per_pair_refined": (t_predict + t_refine) / n,
        "istn_dice_predict": dice_pred,
        "istn_dice_refined": dice_ref,
        "identity_dice": dice_id,
        "istn_model": (f"ISTN-i affine trained in this run for {spec['brief_epochs']} epochs "
                       f"(+1 warm-up batch) on {len(train_set)} synthetic pairs"),
        "istn_training_epochs": spec["brief_epochs"],
        "istn_refine_iterations": iters,
        "istn_refine_mode": cfg.refine_mode,
    }


def _flops(model, train_set, device, step_s: float) -> dict:
    """FLOPs of one training step (forward + backward) of ``model``, counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.train(True)
    batch = _gather(train_set, torch.arange(min(model.cfg.batch_size, len(train_set))), device)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(batch)
        loss.backward()
    for p in model.parameters():
        p.grad = None
    gflop = counter.get_total_flops() / 1e9
    return {"train_step_gflop": gflop, "train_step_s": step_s, "achieved_gflops": gflop / step_s,
            "counted": "convolutions and matrix products (forward + backward) of one 2D affine "
                       "ISTN-i training step; grid sampling, element-wise ops and Adam not "
                       "counted"}


def _peak(device) -> dict:
    """Measured float32 GFLOP/s of a large matmul and a convolution (best of a few runs)."""
    import torch
    import torch.nn.functional as F

    def best(fn, reps):
        fn()
        times = []
        for _ in range(reps):
            t0 = _timer(device)
            fn()
            times.append(_timer(device) - t0)
        return min(times)

    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    mm = 2 * n**3 / best(lambda: a @ b, 5) / 1e9
    batch, ch, hw = (32, 64, 256) if device.type == "cuda" else (8, 64, 128)
    x = torch.randn(batch, ch, hw, hw, device=device)
    w = torch.randn(ch, ch, 3, 3, device=device)
    conv_flop = 2 * batch * ch * ch * 9 * hw * hw
    conv = conv_flop / best(lambda: F.conv2d(x, w, padding=1), 3) / 1e9
    xl, wl = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    conv_cl = conv_flop / best(lambda: F.conv2d(xl, wl, padding=1), 3) / 1e9
    return {"peak_gflops": max(mm, conv, conv_cl), "peak_matmul_gflops": mm,
            "peak_conv_gflops": max(conv, conv_cl), "threads_probe": _threads_probe(device),
            "peak_method": (f"float32 {n}x{n} matmul; conv2d {batch}x{ch}x{hw}x{hw}, {ch} 3x3 "
                            "filters (contiguous and channels_last); best of a few runs"
                            + ("; cuDNN may use TF32 for the convolution (PyTorch's default)"
                               if device.type == "cuda" else ""))}


def _threads_probe(device) -> dict | None:
    """Time a small convolution (an STN layer at batch 1) with the default threads and with 1.

    On a CPU shared with other jobs, OpenMP threads that spin while waiting for a
    descheduled peer make small operations many times slower than one thread is.
    """
    import torch
    import torch.nn.functional as F

    if device.type != "cpu":
        return None
    x, w = torch.randn(1, 16, 29, 29), torch.randn(32, 16, 5, 5)

    def per_call_us() -> float:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(50):
                F.conv2d(x, w)
            runs.append((time.perf_counter() - t0) / 50 * 1e6)
        return sorted(runs)[1]

    threads = torch.get_num_threads()
    per_call_us()
    default = per_call_us()
    torch.set_num_threads(1)
    one = per_call_us()
    torch.set_num_threads(threads)
    return {"threads": threads, "small_conv_us": default, "small_conv_us_1_thread": one}


def _worker(spec: dict) -> dict:
    import torch

    from .config import load_config
    from .data import load_pairs
    from .engine.evaluate import evaluate, predict
    from .engine.model import Model

    device = torch.device(spec["device"])
    if spec["task"] == "peak":
        return _peak(device)
    baseline = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.set_flush_denormal(True)  # as engine.train.train and engine.evaluate.refine do
    data = Path(spec["data"])
    cfg = load_config(data / "config.json", {"batch_size": spec["batch"]})
    train_set = load_pairs(cfg, data / "train.csv", data / "train.seg.csv")
    test_set = load_pairs(cfg, data / "test.csv", data / "test.seg.csv", None,
                          data / "test.points.csv", data / "test.transforms.csv")
    torch.manual_seed(SEED)
    model = Model.build(cfg, "i", spec["transformation"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    gen = torch.Generator().manual_seed(SEED)
    tag = f"  {spec['task']}"

    # Training: one warm-up batch, then timed epochs.
    t0 = time.perf_counter()
    _train_epochs(model, opt, _Head(train_set, cfg.batch_size), device, 1, gen)
    epoch_s = _train_epochs(model, opt, train_set, device, spec["epochs"], gen)
    out: dict[str, Any] = {"size": cfg.size, "spacing": cfg.spacing, "batch_size": cfg.batch_size,
                           "train_pairs": len(train_set), "test_pairs": len(test_set),
                           "timed_epochs": spec["epochs"], "train_epoch_s": epoch_s}
    out["train_s_per_epoch"] = sum(epoch_s) / len(epoch_s)
    out["train_pairs_per_s"] = len(train_set) / out["train_s_per_epoch"]
    out["train_step_s"] = out["train_s_per_epoch"] / math.ceil(len(train_set) / cfg.batch_size)
    out["peak_rss_mb_train"] = _rss_mb()
    _log(f"{tag}: training {out['train_s_per_epoch']:.2f} s/epoch "
         f"({time.perf_counter() - t0:.1f} s)")

    # Test pass: prediction only (warm-up, then repeated), and with every metric.
    n = len(test_set)
    src, trg = test_set.src.to(device), test_set.trg.to(device)
    predict(model, src, trg)
    reps = max(3, math.ceil(spec["predict_pairs"] / n))
    times = []
    for _ in range(reps):
        t0 = _timer(device)
        _, s_p, t_p = predict(model, src, trg)
        times.append(_timer(device) - t0)
    out["predict_ms_per_pair"] = 1e3 * sorted(times)[len(times) // 2] / n
    t0 = _timer(device)
    evaluate(model, test_set, device, progress=False)
    out["test_ms_per_pair_with_metrics"] = 1e3 * (_timer(device) - t0) / n

    # Refinement: one pair at a time vs all test pairs together, both modes.
    iters = spec["refine"]
    out["refine_iterations"] = iters
    out["refine_pairs"] = n
    for mode in ("weights", "params"):
        _time_refine(model, s_p[:1], t_p[:1], 1, mode, 1, device)  # warm-up
        seq = _time_refine(model, s_p, t_p, iters, mode, 1, device) / n
        bat = _time_refine(model, s_p, t_p, iters, mode, 0, device) / n
        key = "refine" if mode == "weights" else "refine_params"
        out[f"{key}_s_per_pair_sequential"] = seq
        out[f"{key}_s_per_pair_batched"] = bat
        out[f"{key}_batched_speedup"] = seq / bat
        _log(f"{tag}: refinement ({mode}) {seq:.2f} s/pair one at a time, "
             f"{bat:.2f} s/pair batched")
    out["refine_mode_default"] = cfg.refine_mode
    out["peak_rss_mb"] = _rss_mb()
    out["baseline_rss_mb"] = baseline
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20

    if spec.get("extras"):
        out["flops"] = _flops(model, train_set, device, out["train_step_s"])
        done = spec["epochs"]
        out["classical"] = _classical(model, opt, train_set, test_set, device, spec, done, gen)
    return out


class _Head:
    """The first ``n`` pairs of a PairSet (the warm-up batch)."""

    def __init__(self, ps, n: int):
        self._ps, self._n = ps, min(n, len(ps))

    def __len__(self) -> int:
        return self._n

    def __getattr__(self, name):
        t = getattr(self._ps, name)
        return t[: self._n] if t is not None else None


# ----------------------------------------------------------------------------- driver


def _run_worker(spec: dict, folder: Path) -> dict:
    name = spec["task"]
    spec_path, result_path = folder / f"{name}.spec.json", folder / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    src_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                    else "")
    cmd = [sys.executable, "-m", "istn.bench", "--worker", str(spec_path), str(result_path)]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not result_path.is_file():
        raise RuntimeError(f"benchmark worker '{name}' failed (exit code {proc.returncode})")
    return json.loads(result_path.read_text())


def _capped(plan: dict[str, Any]) -> dict[str, Any]:
    """``plan`` with its epochs and iterations lowered to ``ISTN_EXAMPLE_EPOCHS`` /
    ``ISTN_EXAMPLE_REFINE`` where set (:func:`istn.config.example_caps`; at least one
    timed iteration); the plan itself where neither is set."""
    from .config import example_caps

    caps = example_caps()
    if not caps:
        return plan
    plan = dict(plan)
    if "epochs" in caps:
        plan["epochs"] = min(plan["epochs"], caps["epochs"])
        plan["brief_epochs"] = min(plan["brief_epochs"], caps["epochs"])
    if "refine" in caps:
        plan["refine"] = min(plan["refine"], max(1, caps["refine"]))
    return plan


def run(out: Path, quick: bool = False, device: str | None = None) -> dict:
    """Run the whole benchmark; write ``out/bench.json`` and return its content."""
    import torch

    from .synth import generate

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("istn.bench: --device cuda but no CUDA device is available")
    plan = _capped(PLANS["quick" if quick else "full"])
    t_start = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    result: dict[str, Any] = {
        "device": _describe_device(device),
        "mode": "quick" if quick else "full",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": list(load_start) if load_start else None,
        "plan": plan,
        "environment": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                        "MKL_NUM_THREADS")},
    }
    tmp = Path(tempfile.mkdtemp(prefix="istn-bench-"))
    try:
        t0 = time.perf_counter()
        for dim in ("2d", "3d"):
            p = plan[dim]
            generate(tmp / dim, dim=int(dim[0]), n_train=p["train"], n_test=p["test"],
                     size=p["size"], seed=SEED)
        result["data_generation_s"] = time.perf_counter() - t0
        _log(f"istn.bench ({result['mode']}) on {result['device']}; data generated in "
             f"{result['data_generation_s']:.1f} s")
        peak = _run_worker({"task": "peak", "device": device}, tmp)
        result["threads_probe"] = peak.pop("threads_probe", None)
        result["2d"], result["3d"] = {}, {}
        for dim, transformation in CONFIGS:
            p = plan[dim]
            spec = {"task": f"{dim}-{transformation}", "data": str(tmp / dim), "device": device,
                    "transformation": transformation, "batch": p["batch"],
                    "epochs": plan["epochs"], "refine": plan["refine"],
                    "brief_epochs": plan["brief_epochs"],
                    "predict_pairs": plan["predict_pairs"],
                    "extras": (dim, transformation) == ("2d", "affine")}
            t0 = time.perf_counter()
            _log(f"  {spec['task']}: {p['train']} training pairs {'x'.join(map(str, p['size']))},"
                 f" batch {p['batch']}, {p['test']} test pairs ...")
            res = _run_worker(spec, tmp)
            res["wall_s"] = time.perf_counter() - t0
            if "classical" in res:
                result["classical"] = res.pop("classical")
                flops = res.pop("flops")
            result[dim][transformation] = res
        flops.update(peak)
        flops["achieved_fraction"] = flops["achieved_gflops"] / flops["peak_gflops"]
        result["flops"] = flops
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["reference"] = _reference(result, plan)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["load_average_end"] = list(load_end) if load_end else None
    result["total_s"] = time.perf_counter() - t_start
    out.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps(result, indent=2) + "\n", layout.bench_result(out))
    print(format_report(result))
    print(f"\nwritten: {layout.bench_result(out)} (total {result['total_s']:.0f} s)")
    return result


def _reference(result: dict, plan: dict) -> dict:
    """This run's 2D affine figures next to the published code's, scaled where needed.

    With --quick the epoch has fewer pairs and refinement fewer iterations: training is
    scaled to 100 pairs (from pairs/s) and refinement to 50 iterations (linearly).
    """
    r = result["2d"]["affine"]
    scale_refine = PUBLISHED_REFINE_ITERATIONS / r["refine_iterations"]
    ours = {
        "train_s_per_epoch": PUBLISHED_PAIRS / r["train_pairs_per_s"],
        "test_ms_per_pair": r["test_ms_per_pair_with_metrics"],
        "refine_s_per_pair_sequential": r["refine_s_per_pair_sequential"] * scale_refine,
        "refine_s_per_pair_batched": r["refine_s_per_pair_batched"] * scale_refine,
    }
    published = {
        "train_s_per_epoch": PUBLISHED_TRAIN_S_PER_EPOCH,
        "test_ms_per_pair": PUBLISHED_TEST_MS_PER_PAIR,
        "refine_s_per_pair_sequential": PUBLISHED_REFINE_S_PER_PAIR,
        "refine_s_per_pair_batched": PUBLISHED_REFINE_S_PER_PAIR,
    }
    return {
        "published": published,
        "this_run": ours,
        "ratio": {k: ours[k] / published[k] for k in ours},
        "scaled": r["train_pairs"] != PUBLISHED_PAIRS
        or r["refine_iterations"] != PUBLISHED_REFINE_ITERATIONS,
        "provenance": "published research code, 2 CPU cores, synthetic 2D, ISTN-i affine; "
                      "test figure includes metrics; refinement one pair at a time",
    }


# ----------------------------------------------------------------------------- report


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def format_report(result: dict) -> str:
    """The printed tables of a result dict (as written to bench.json)."""
    lines = [f"\nistn benchmark ({result['mode']}), {result['device']}"]
    if result.get("load_average_start"):
        la = result["load_average_start"], result.get("load_average_end") or ["?"]
        lines.append(f"load average (1 min) at start {la[0][0]:.2f}, at end "
                     f"{la[1][0] if isinstance(la[1][0], str) else f'{la[1][0]:.2f}'} "
                     f"(other jobs make every figure slower)")
    probe = result.get("threads_probe")
    if probe and probe["threads"] > 1 and probe["small_conv_us"] > 1.5 * probe[
            "small_conv_us_1_thread"]:
        lines.append(f"WARNING: the CPU looks oversubscribed: a small convolution takes "
                     f"{probe['small_conv_us']:.0f} us with {probe['threads']} threads but "
                     f"{probe['small_conv_us_1_thread']:.0f} us with 1; every figure below "
                     "suffers (try OMP_WAIT_POLICY=PASSIVE or OMP_NUM_THREADS=1)")
    env = {k: v for k, v in (result.get("environment") or {}).items() if v}
    if env:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    head = (f"{'config':<12} {'grid':>9} {'pairs':>5} {'s/epoch':>8} {'pairs/s':>8} "
            f"{'pred ms':>8} {'test ms':>8} {'ref seq':>8} {'ref bat':>8} {'ratio':>6} "
            f"{'par seq':>8} {'par bat':>8} {'ratio':>6} {'RSS MB':>7}")
    lines += ["", "ISTN-i: training (s per epoch, pairs/s), test (ms per pair: prediction only, "
              "prediction + metrics),",
              "refinement (s per pair, one at a time vs all test pairs together, ratio = "
              "seq/batched; 'weights' default, 'params')", head, "-" * len(head)]
    for dim in ("2d", "3d"):
        for tr in ("affine", "bspline"):
            r = result[dim][tr]
            grid = "x".join(str(s) for s in r["size"])
            mem = _fmt(r["peak_rss_mb"], 0)
            if "peak_gpu_mb" in r:
                mem += f" (GPU {r['peak_gpu_mb']:.0f})"
            lines.append(
                f"{dim + ' ' + tr:<12} {grid:>9} {r['train_pairs']:>5} "
                f"{_fmt(r['train_s_per_epoch']):>8} {_fmt(r['train_pairs_per_s']):>8} "
                f"{_fmt(r['predict_ms_per_pair'], 1):>8} "
                f"{_fmt(r['test_ms_per_pair_with_metrics'], 1):>8} "
                f"{_fmt(r['refine_s_per_pair_sequential']):>8} "
                f"{_fmt(r['refine_s_per_pair_batched']):>8} "
                f"{_fmt(r['refine_batched_speedup']):>6} "
                f"{_fmt(r['refine_params_s_per_pair_sequential']):>8} "
                f"{_fmt(r['refine_params_s_per_pair_batched']):>8} "
                f"{_fmt(r['refine_params_batched_speedup']):>6} {mem:>7}")
    r2 = result["2d"]["affine"]
    lines.append(f"({r2['timed_epochs']} timed epochs after 1 warm-up batch; refinement "
                 f"{r2['refine_iterations']} iterations over the {r2['test_pairs']} (2D) / "
                 f"{result['3d']['affine']['test_pairs']} (3D) test pairs; RSS = peak of a fresh "
                 f"process per configuration incl. Python + PyTorch, about "
                 f"{r2['baseline_rss_mb']:.0f} MB after imports)")
    c = result["classical"]
    lines += ["", f"2D affine registration of the same {c['pairs']} test pairs "
              f"(no registration: Dice {c['identity_dice']:.3f})",
              f"  SimpleITK affine (mean squares, 3 levels)   {c['simpleitk_s_per_pair']:8.3f} "
              f"s/pair   Dice {c['simpleitk_dice']:.3f}",
              f"  istn prediction                             {c['istn_s_per_pair_predict']:8.3f} "
              f"s/pair   Dice {c['istn_dice_predict']:.3f}",
              f"  istn prediction + refinement ({c['istn_refine_iterations']} it, batched) "
              f"{c['istn_s_per_pair_refined']:8.3f} s/pair   Dice {c['istn_dice_refined']:.3f}",
              f"  ({c['istn_model']}; Dice only places the timings in context)"]
    f = result["flops"]
    lines += ["", f"compute: one 2D affine ISTN-i training step = {f['train_step_gflop']:.2f} "
              f"GFLOP (counted: convolutions, matrix products) in {f['train_step_s']:.3f} s = "
              f"{f['achieved_gflops']:.2f} GFLOP/s",
              f"  measured peak {f['peak_gflops']:.1f} GFLOP/s (matmul "
              f"{f['peak_matmul_gflops']:.1f}, conv {f['peak_conv_gflops']:.1f}); achieved "
              f"fraction {100 * f['achieved_fraction']:.1f} %"]
    ref = result["reference"]
    p, o, q = ref["published"], ref["this_run"], ref["ratio"]
    scaled = " (scaled to 100 pairs / 50 iterations)" if ref["scaled"] else ""
    lines += ["", f"vs. the published research code (2 CPU cores, synthetic 2D, ISTN-i affine)"
              f"{scaled}; ratio > 1: this run is slower"]
    for key, label, digits in (
            ("train_s_per_epoch", "training s/epoch (100 pairs, batch 10)", 2),
            ("test_ms_per_pair", "test ms/pair (prediction + metrics)", 1),
            ("refine_s_per_pair_sequential", "refinement s/pair, 50 it, one at a time", 2),
            ("refine_s_per_pair_batched", "refinement s/pair, 50 it, all pairs batched", 2)):
        lines.append(f"  {label:<44} published {p[key]:7.{digits}f}   this run "
                     f"{o[key]:7.{digits}f}   ratio {q[key]:.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m istn.bench",
        description="Benchmark istn training, testing and refinement (2D/3D, affine/B-spline) "
                    "on synthetic data, with a SimpleITK baseline; writes OUT/bench.json.")
    ap.add_argument("--out", type=Path, default=Path("."),
                    help="folder for bench.json (default: current folder)")
    ap.add_argument("--quick", action="store_true",
                    help="reduced run (fewer pairs, epochs and iterations; 3D 48^3) for CI")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        from .cli.common import keep_freed_memory

        keep_freed_memory()  # as the istn commands do
        spec = json.loads(Path(args.worker[0]).read_text())
        res = _worker(spec)
        Path(args.worker[1]).write_text(json.dumps(res))
        return 0
    run(args.out, args.quick, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

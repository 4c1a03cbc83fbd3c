"""``istn demo``: synthetic 2D data, ISTN-i affine training, testing with refinement."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from . import layout
from .config import load_config
from .errors import IstnError

# Chosen so that the whole demo finishes in a few minutes on a 2-core CPU:
# 128x128 images as published, fewer pairs and epochs than the paper's 100.
DEMO_TRAIN_PAIRS = 100
DEMO_VAL_PAIRS = 5
DEMO_TEST_PAIRS = 10
DEMO_EPOCHS = 40


def run_demo(out: Path, seed: int = 0, epochs: int | None = None,
             device: torch.device | None = None, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Generate data, train ISTN-i (affine), test with and without refinement, report."""
    from .data import load_pairs
    from .engine.model import Model
    from .engine.test import format_table, run_test
    from .engine.train import train
    from .synth import generate

    test = layout.test_dir(out)
    if layout.test_summary(test).exists() or layout.train_dir(out).exists():
        if not overwrite:
            raise IstnError(f"demo output folder '{out}' already holds a run; "
                            "use --overwrite or another --out")
        for folder in (layout.demo_data_dir(out), layout.train_dir(out), test,
                       layout.tensorboard_dir(out)):
            shutil.rmtree(folder, ignore_errors=True)
    device = device or torch.device("cpu")
    t0 = time.perf_counter()
    data = layout.demo_data_dir(out)
    generate(data, dim=2, n_train=DEMO_TRAIN_PAIRS, n_val=DEMO_VAL_PAIRS,
             n_test=DEMO_TEST_PAIRS, seed=seed)
    print(f"[1/3] generated {DEMO_TRAIN_PAIRS} training and {DEMO_TEST_PAIRS} test pairs "
          f"in '{data}' ({time.perf_counter() - t0:.1f} s)")
    cfg = load_config(layout.dataset_config(data),
                      {"epochs": epochs or DEMO_EPOCHS, "val_interval": 10})
    torch.manual_seed(seed)
    model = Model.build(cfg, "i", "affine")

    def csv(split: str, kind: str = "") -> Path:
        return layout.dataset_csv(data, split, kind)

    train_set = load_pairs(cfg, csv("train"), csv("train", "seg"))
    val_set = load_pairs(cfg, csv("val"), csv("val", "seg"))
    test_set = load_pairs(cfg, csv("test"), csv("test", "seg"), None, csv("test", "points"),
                          csv("test", "transforms"))
    t1 = time.perf_counter()
    train(model, train_set, val_set, out, device, seed, progress=progress)
    print(f"[2/3] trained ISTN-i affine for {cfg.epochs} epochs ({time.perf_counter() - t1:.1f} s)")
    summary = run_test(model, test_set, out, device, cfg.refine, progress=progress)
    print(f"[3/3] tested {len(test_set)} pairs, refinement {cfg.refine} iterations "
          f"({summary['seconds']:.1f} s)\n")
    print(format_table(summary))
    print(f"\nresults: {layout.test_summary(test)}, {layout.test_metrics(test)}\n"
          f"report (open in a browser): {layout.test_report(test)}\n"
          f"picture: {layout.test_pairs(test)}; loss curve: "
          f"{layout.loss_curve(out)}; TensorBoard: {layout.tensorboard_dir(out)}\n"
          f"total {time.perf_counter() - t0:.1f} s")
    return summary

"""Every folder and file istn writes, named in one place.

Convention: a function takes the output folder ``out`` or, for a folder that stands
on its own (a model folder given to ``--model``, a test folder, a registered pair's
folder, a data set), that folder; it returns a Path and creates or checks nothing.
An output folder ``OUT`` (``--out`` of ``istn train``, ``istn test``, ``istn-reg``,
``istn demo``) holds::

    OUT/train/                          train_dir(out)
    OUT/train/model/                    model_dir(out): what ``--model`` reads
        checkpoint.pt                   checkpoint(model_dir): the latest (CHECKPOINT)
        checkpoint_epochNNNN.pt         epoch_checkpoint(model_dir, epoch): the kept ones
        model.json                      model_info(model_dir): the model's metadata
    OUT/train/train.lock                train_lock(out): while a training runs
    OUT/train/history.json              history(out)
    OUT/train/loss_curve.png            loss_curve(out)
    OUT/train/temp/val_epochNNNN.png    val_picture(out, epoch) (``--save_temp``)
    OUT/tensorboard/                    tensorboard_dir(out)
    OUT/test/                           test_dir(out)
        test_results.yml                test_results(test_dir): before refinement
        test_results_refined.yml        test_results(test_dir, refined=True)
        metrics.csv                     test_metrics(test_dir)
        summary.json                    test_summary(test_dir): a finished test
        pairs.png                       test_pairs(test_dir)
        report.html                     test_report(test_dir): the cohort report
        PAIR_KEY.nii.gz                 test_image(test_dir, pair, key)
    OUT/data/                           demo_data_dir(out): the demo's synthetic data

``istn register --out OUT`` writes one pair's files (register_file) into OUT, or
with ``--pairs`` one folder per pair (register_pair_names), ``OUT/metrics.csv``
(register_metrics) and ``OUT/report.html`` (register_report); a pair's folder is
written as ``.NAME.istn-new`` (staging_dir) and renamed into place, the one it
replaces renamed to ``.NAME.istn-old`` (replaced_dir) first. A synthetic data set
(``istn synth``) lists its pairs in ``ROOT/SPLIT[.KIND].csv`` (dataset_csv) beside
``ROOT/config.json`` (dataset_config).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# ------------------------------------------------------------------- training: OUT/train

CHECKPOINT = "checkpoint.pt"
MODEL_INFO = "model.json"
# glob patterns in a model folder: the kept per-epoch checkpoints, and the temporary
# files an atomic checkpoint write leaves when killed (istn.io.atomic_path names them)
EPOCH_CHECKPOINTS = "checkpoint_epoch*.pt"
TEMP_CHECKPOINTS = ".checkpoint*.pt"


def train_dir(out: Path) -> Path:
    return Path(out) / "train"


def model_dir(out: Path) -> Path:
    return train_dir(out) / "model"


def checkpoint(model_dir: Path) -> Path:
    """The latest checkpoint, rewritten at the end of every epoch."""
    return Path(model_dir) / CHECKPOINT


def epoch_checkpoint(model_dir: Path, epoch: int) -> Path:
    return Path(model_dir) / f"checkpoint_epoch{epoch:04d}.pt"


def model_info(model_dir: Path) -> Path:
    return Path(model_dir) / MODEL_INFO


def train_lock(out: Path) -> Path:
    """Held by a running training (its PID and host): a second one into OUT is refused."""
    return train_dir(out) / "train.lock"


def history(out: Path) -> Path:
    return train_dir(out) / "history.json"


def loss_curve(out: Path) -> Path:
    return train_dir(out) / "loss_curve.png"


def val_picture(out: Path, epoch: int) -> Path:
    return train_dir(out) / "temp" / f"val_epoch{epoch:04d}.png"


def tensorboard_dir(out: Path) -> Path:
    return Path(out) / "tensorboard"


# ---------------------------------------------------------------------- testing: OUT/test

def test_dir(out: Path) -> Path:
    return Path(out) / "test"


def test_results(test_dir: Path, refined: bool = False) -> Path:
    """Per-pair metrics and means as published (YAML), before or after refinement."""
    return Path(test_dir) / ("test_results_refined.yml" if refined else "test_results.yml")


def test_metrics(test_dir: Path) -> Path:
    return Path(test_dir) / "metrics.csv"


def test_summary(test_dir: Path) -> Path:
    """Written last by a test: its presence marks a finished test."""
    return Path(test_dir) / "summary.json"


def test_pairs(test_dir: Path) -> Path:
    return Path(test_dir) / "pairs.png"


def test_report(test_dir: Path) -> Path:
    """The HTML cohort report of a test (one row per pair; pictures embedded)."""
    return Path(test_dir) / "report.html"


def test_image(test_dir: Path, pair: str, key: str) -> Path:
    """One output image of one pair, e.g. ``PAIR_warped_src_refined.nii.gz``."""
    return Path(test_dir) / f"{pair}_{key}.nii.gz"


# ------------------------------------------------------------------- istn register

REGISTER_FILES = {"warped": "warped_source.nii.gz", "warped_seg": "warped_source_seg.nii.gz",
                  "affine": "transform.tfm", "field": "displacement.nii.gz",
                  "composite": "transform.h5", "inverse": "inverse.h5",
                  "metrics": "metrics.json", "report": "report.png"}


def register_file(folder: Path, key: str) -> Path:
    """The file ``REGISTER_FILES[key]`` of the pair registered into ``folder``."""
    return Path(folder) / REGISTER_FILES[key]


def register_pair_names(sources: Sequence[str | Path]) -> list[str]:
    """Folder names for ``istn register --pairs``: ``NNNN_STEM`` (row number, source stem).

    The row number keeps pairs with the same source file name apart.
    """
    return [f"{i:04d}_{Path(s).name.split('.')[0]}" for i, s in enumerate(sources)]


def staging_dir(folder: Path) -> Path:
    """``.NAME.istn-new`` beside ``folder``: results being written (istn.io.replace_folder)."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.istn-new"


def replaced_dir(folder: Path) -> Path:
    """``.NAME.istn-old`` beside ``folder``: the previous results while the new ones move in."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.istn-old"


def register_metrics(out: Path) -> Path:
    """The metrics of every pair of ``istn register --pairs``, one row per label."""
    return Path(out) / "metrics.csv"


def register_report(out: Path) -> Path:
    """The HTML cohort report of ``istn register --pairs`` (links each pair's report.png)."""
    return Path(out) / "report.html"


# --------------------------------------------------------------- data sets and the demo

def demo_data_dir(out: Path) -> Path:
    return Path(out) / "data"


# the pair lists of one split: images, segmentations, landmark images, transforms
DATASET_KINDS = ("", "seg", "points", "transforms")


def dataset_csv(root: Path, split: str, kind: str = "") -> Path:
    """``ROOT/SPLIT.csv`` (images) or ``ROOT/SPLIT.KIND.csv`` (KIND: seg, points, transforms)."""
    return Path(root) / (f"{split}.{kind}.csv" if kind else f"{split}.csv")


def bench_result(out: Path) -> Path:
    """``python -m istn.bench --out OUT``: every figure of the benchmark run."""
    return Path(out) / "bench.json"


def dataset_config(root: Path) -> Path:
    return Path(root) / "config.json"

"""The published project's commands (biomedia-mira/istn README and istn-reg.py), adapted
only in paths, run with istn's ``istn-reg`` (issue #14).

The only change to each command is ``python istn-reg.py`` -> ``istn-reg`` (the console
script). Their data are where the published code expects them, relative to the working
directory, in a scratch folder:

* ``data/synth2d``: pairs of the published synthetic 2D set (``../shared/data/synth2d``)
  split as the published folder is, into ``train*.csv`` and ``val*.csv`` (to keep CI
  short: its first 16 pairs for training and the last 4 for validation), with the
  published ``config.json``. The 2D commands give neither ``--train``
  nor ``--test``: like the published script, ``istn-reg`` then takes its defaults
  (``--train data/synth2d/train.csv --train_seg data/synth2d/train.seg.csv --val
  data/synth2d/val.csv --val_seg ... --test data/synth2d/val.csv --test_seg ...``).
* ``data/brain3d``: ``istn synth brain`` (4 training, 2 test pairs; the MNI152 template
  from nilearn), with ``val*.csv`` = its test pairs, ``*.msk.csv`` listing brain masks
  made from its label maps (label > 0; the generator writes none), and
  ``configs/brain3d_affine.json`` as ``config.affine.json``.

``ISTN_EXAMPLE_EPOCHS=1`` and ``ISTN_EXAMPLE_REFINE=2`` cap the published 100 / 400 epochs
and 50 refinement iterations.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_2D = REPO.parent / "shared" / "data" / "synth2d"
CAPS = {"ISTN_EXAMPLE_EPOCHS": "1", "ISTN_EXAMPLE_REFINE": "2"}
N_TRAIN, N_VAL = 16, 4  # the first 16 published pairs train; the last 4 validate (and test)

# The published README's command and those of istn-reg.py's comments, as published
# except 'python istn-reg.py' -> 'istn-reg'.
COMMANDS_2D = {
    "i": "istn-reg --config data/synth2d/config.json --transformation affine --loss i "
         "--out output/istn-i --model output/istn-i/train/model",
    "u": "istn-reg --config data/synth2d/config.json --transformation affine --loss u "
         "--out output/stn-u --model output/stn-u/train/model",
    "s": "istn-reg --config data/synth2d/config.json --transformation affine --loss s "
         "--out output/stn-s --model output/stn-s/train/model",
    "e": "istn-reg --config data/synth2d/config.json --transformation affine --loss e "
         "--out output/stn-e --model output/stn-e/train/model",
}
COMMAND_3D = (
    "istn-reg --mode3d --loss i --out output3d/istn-i --model output3d/istn-i/train/model "
    "--config data/brain3d/config.affine.json --train data/brain3d/train.csv "
    "--train_seg data/brain3d/train.seg.csv --train_msk data/brain3d/train.msk.csv "
    "--val data/brain3d/val.csv --val_seg data/brain3d/val.seg.csv "
    "--val_msk data/brain3d/val.msk.csv --test data/brain3d/test.csv "
    "--test_seg data/brain3d/test.seg.csv --test_msk data/brain3d/test.msk.csv")

pytestmark = pytest.mark.slow


def istn_reg(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run an ``istn-reg ...`` command line (this environment's istn-reg) in ``cwd``."""
    exe = Path(sys.executable).with_name("istn-reg")
    argv = shlex.split(command)
    assert argv[0] == "istn-reg"
    argv[0] = str(exe) if exe.is_file() else "istn-reg"
    proc = subprocess.run(argv, cwd=cwd, env={**os.environ, **CAPS}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def _write(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["src", "trg"])
        w.writerows(rows)


@pytest.fixture(scope="module")
def synth2d_folder(tmp_path_factory) -> Path:
    """A working directory with the published 2D set in ``data/synth2d`` (train/val split)."""
    assert PUBLISHED_2D.is_dir(), f"the published 2D data are not in {PUBLISHED_2D}"
    work = tmp_path_factory.mktemp("original2d")
    data = work / "data" / "synth2d"
    data.mkdir(parents=True)
    shutil.copy(PUBLISHED_2D / "config.json", data / "config.json")
    for kind in ("", ".seg"):
        rows = [[str((PUBLISHED_2D / p).resolve()) for p in r]
                for r in _rows(PUBLISHED_2D / f"train{kind}.csv")]
        _write(data / f"train{kind}.csv", rows[:N_TRAIN])
        _write(data / f"val{kind}.csv", rows[-N_VAL:])
    return work


@pytest.mark.parametrize("loss", list(COMMANDS_2D))
def test_published_2d_command(loss, synth2d_folder):
    proc = istn_reg(COMMANDS_2D[loss], synth2d_folder)
    out = synth2d_folder / COMMANDS_2D[loss].split("--out ")[1].split()[0]
    assert ("the published defaults --train data/synth2d/train.csv, --train_seg "
            "data/synth2d/train.seg.csv, --val data/synth2d/val.csv, --val_seg "
            "data/synth2d/val.seg.csv, --test data/synth2d/val.csv, --test_seg "
            "data/synth2d/val.seg.csv") in proc.stdout
    assert "capping training epochs at 1" in proc.stderr
    for name in ("train/model/checkpoint.pt", "test/test_results.yml",
                 "test/test_results_refined.yml", "test/summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "test" / "summary.json").read_text())
    assert summary["pairs"] == N_VAL and summary["after_refinement"] is not None


def test_published_3d_brain_command(tmp_path):
    pytest.importorskip("nilearn")  # part of the test extra; istn.brain's template
    import SimpleITK as sitk

    from istn.cli import main

    data = tmp_path / "data" / "brain3d"
    assert main(["synth", "brain", "--out", str(data), "--pairs", "4", "--test", "2"]) == 0
    shutil.copy(REPO / "configs" / "brain3d_affine.json", data / "config.affine.json")
    for split in ("train", "test"):
        masks = []
        for row in _rows(data / f"{split}.labels.csv"):
            pair = []
            for name in row:
                labels = sitk.ReadImage(str(data / name))
                mask = sitk.Cast(labels > 0, sitk.sitkUInt8)
                mask_name = name.replace("_labels.nii.gz", "_msk.nii.gz")
                sitk.WriteImage(mask, str(data / mask_name))
                pair.append(mask_name)
            masks.append(pair)
        _write(data / f"{split}.msk.csv", masks)
    for kind in ("", ".seg", ".msk"):
        shutil.copy(data / f"test{kind}.csv", data / f"val{kind}.csv")
    istn_reg(COMMAND_3D, tmp_path)
    out = tmp_path / "output3d" / "istn-i"
    for name in ("train/model/checkpoint.pt", "test/test_results_refined.yml",
                 "test/summary.json"):
        assert (out / name).is_file(), name

"""Every command does what it says: the cases of the issue, one test (or more) each.

Each test failed before its fix; the README's Troubleshooting table has a row for each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from istn.cli import main, main_reg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(small_synth2d: Path) -> Path:
    return small_synth2d


def user_error(capsys, argv: list[str], *needles: str, reg: bool = False) -> str:
    """Run the CLI in-process; assert exit 2 and one stderr line containing ``needles``."""
    code = (main_reg if reg else main)(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("istn: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def reg_args(data: Path, *extra: str) -> list[str]:
    """The published istn-reg command line (with a short, quiet CPU run)."""
    return ["--config", str(data / "config.json"), "--transformation", "affine", "--loss", "i",
            "--train", str(data / "train.csv"), "--train_seg", str(data / "train.seg.csv"),
            "--test", str(data / "test.csv"), "--test_seg", str(data / "test.seg.csv"),
            "--out", "OUT", *extra, "--epochs", "1", "--batch_size", "4", "--quiet",
            "--dev", "cpu", "--no_refine"]


# ------------------------------------------------------------- 1: istn-reg --train --model


def test_published_reg_command_with_model(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main_reg(reg_args(data, "--model", "OUT/train/model")) == 0, capsys.readouterr().err
    assert (tmp_path / "OUT/train/model/checkpoint.pt").is_file()
    assert (tmp_path / "OUT/test/summary.json").is_file()


def test_reg_train_with_another_model_folder_is_refused(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    user_error(capsys, reg_args(data, "--model", "elsewhere"), "--model 'elsewhere'",
               "OUT/train/model", reg=True)
    assert not (tmp_path / "OUT").exists()

"""Reliability and safety: one-line errors, nothing half-written, safe checkpoints, resuming.

Every bad input must end with exit code 2 and exactly one line on stderr that names the
offending file, row or key (no traceback unless --debug), and must leave no output behind.
Training must survive SIGINT/SIGTERM/SIGKILL: a resumed run ends with the same weights as an
uninterrupted one (CPU, fixed seed). Checkpoints can never run code.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import istn.engine.train as train_mod
from cli_helpers import user_error
from istn.cli import main, main_reg
from istn.config import Config, from_dict, load_config
from istn.data import load_pairs, read_pair_csv
from istn.engine.checkpoint import read_checkpoint
from istn.errors import IstnError

EPOCHS = 6  # training runs below: 8 pairs, batch 4 -> 2 batches per epoch


# ----------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(small_synth2d: Path) -> Path:
    return small_synth2d


def train_args(data: Path, out: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    return ["train", "--config", str(data / "config.json"), "--train", str(data / "train.csv"),
            "--train_seg", str(data / "train.seg.csv"), "--out", str(out), "--epochs",
            str(epochs), "--batch_size", "4", "--quiet", "--dev", "cpu", "--seed", "3", *extra]


def args_test(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["test", "--model", str(model), "--test", str(data / "test.csv"), "--test_seg",
            str(data / "test.seg.csv"), "--out", str(out), "--quiet", "--dev", "cpu",
            "--no_refine", *extra]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A 1-epoch ISTN-i affine model on 48x48 (model folder)."""
    out = tmp_path_factory.mktemp("trained")
    assert main(train_args(data, out, "--overwrite", epochs=1)) == 0
    return out / "train" / "model"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict:
    """The final checkpoint of an uninterrupted run (compared with resumed runs)."""
    out = tmp_path_factory.mktemp("reference")
    assert main(train_args(data, out, "--overwrite")) == 0
    return torch.load(out / "train" / "model" / "checkpoint.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    for net in ("stn", "itn"):
        assert a[net].keys() == b[net].keys()
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert a["epoch"] == b["epoch"] == EPOCHS
    for ra, rb in zip(json.loads(a["extra"]["history"]), json.loads(b["extra"]["history"]),
                      strict=True):
        assert ra["train_loss"] == rb["train_loss"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def write_image(path: Path, arr: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=False), str(path))
    return path


def csv_of(path: Path, rows: list[tuple[Path, Path]]) -> Path:
    return write(path, "src,trg\n" + "".join(f"{a},{b}\n" for a, b in rows))


def first_pair(data: Path, csv: str = "train.csv") -> tuple[Path, Path]:
    return read_pair_csv(data / csv)[0]


# ----------------------------------------------------------------------------- bad inputs


def test_missing_csv(data, tmp_path, capsys):
    out = tmp_path / "o"
    user_error(capsys, train_args(data, out)[:4] + ["missing.csv"] + train_args(data, out)[5:],
               "missing.csv", "does not exist")
    assert not out.exists()


def test_missing_image_names_the_file(data, tmp_path, capsys):
    s, _ = first_pair(data)
    bad = csv_of(tmp_path / "bad.csv", [(s, tmp_path / "nowhere.png")])
    out = tmp_path / "o"
    args = train_args(data, out, "--loss", "u")
    args[args.index("--train") + 1] = str(bad)
    args.remove("--train_seg")
    args.remove(str(data / "train.seg.csv"))
    user_error(capsys, args, "nowhere.png", "does not exist")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["corrupt", "directory", "empty_file"])
def test_unreadable_image(data, tmp_path, capsys, kind):
    s, _ = first_pair(data)
    bad = tmp_path / "bad.png"
    if kind == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    elif kind == "directory":
        bad.mkdir()
    else:
        bad.write_bytes(b"")
    out = tmp_path / "o"
    csv_of(tmp_path / "t.csv", [(s, bad)])
    targs = train_args(data, out, "--loss", "u")
    targs[targs.index("--train") + 1] = str(tmp_path / "t.csv")
    del targs[targs.index("--train_seg"):targs.index("--train_seg") + 2]
    user_error(capsys, targs, "bad.png", "directory" if kind == "directory" else "cannot be read")
    assert not out.exists()


def test_unreadable_csv_permissions(data, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root can read files without read permission")
    bad = write(tmp_path / "locked.csv", "src,trg\n")
    bad.chmod(0)
    args = train_args(data, tmp_path / "o")
    args[args.index("--train") + 1] = str(bad)
    user_error(capsys, args, "locked.csv")


@pytest.mark.parametrize("text, needle", [
    ("a.png,b.png\n", "header row 'src,trg'"),
    ("source,target\na.png,b.png\n", "header row 'src,trg'"),
    ("", "is empty"),
    ("src,trg\n", "no pairs"),
    ("src,trg\nonly_one_column.png\n", "line 2"),
    ("src,trg\n\xff\xfe\n", ""),
])
def test_bad_pair_csv(data, tmp_path, capsys, text, needle):
    bad = tmp_path / "pairs.csv"
    bad.write_bytes(text.encode("latin-1"))
    out = tmp_path / "o"
    args = train_args(data, out)
    args[args.index("--train") + 1] = str(bad)
    user_error(capsys, args, "pairs.csv", needle)
    assert not out.exists()


def test_csv_is_a_directory(data, tmp_path, capsys):
    args = train_args(data, tmp_path / "o")
    args[args.index("--train") + 1] = str(tmp_path)
    user_error(capsys, args, str(tmp_path), "not a file")


@pytest.mark.parametrize("flag", ["--test_seg", "--test_msk", "--test_points",
                                  "--test_transforms"])
def test_parallel_csvs_with_different_row_counts(data, trained, tmp_path, capsys, flag):
    short = csv_of(tmp_path / "short.csv", [first_pair(data, "test.seg.csv")])
    out = tmp_path / "o"
    args = args_test(data, trained, out)
    if flag in args:
        args[args.index(flag) + 1] = str(short)
    else:
        args += [flag, str(short)]
    user_error(capsys, args, "short.csv", "lists 1 pairs", "lists 2")
    assert not out.exists()


def test_2d_image_with_3d_config(data, tmp_path, capsys):
    out = tmp_path / "o"
    user_error(capsys, train_args(data, out, "--mode3d"), "--mode3d", "2D")
    cfg3d = write(tmp_path / "c3.json", json.dumps({"size": [36, 36, 36],
                                                   "spacing": [1, 1, 1]}))
    args = train_args(data, out)
    args[args.index("--config") + 1] = str(cfg3d)
    user_error(capsys, args, "is 2D but the config is 3D", "V_square_source")
    assert not out.exists()


def test_3d_image_with_2d_config_and_mixed_dimensions(data, tmp_path, capsys):
    s, _ = first_pair(data)
    vol = write_image(tmp_path / "vol.nii.gz", np.ones((8, 8, 8), np.float32))
    out = tmp_path / "o"
    for rows in ([(vol, vol)], [(s, vol)]):  # 3D pair; 2D source with 3D target
        args = train_args(data, out, "--loss", "u")
        args[args.index("--train") + 1] = str(csv_of(tmp_path / "p.csv", rows))
        del args[args.index("--train_seg"):args.index("--train_seg") + 2]
        user_error(capsys, args, "vol.nii.gz", "is 3D but the config is 2D")
    assert not out.exists()


@pytest.mark.parametrize("cfg, needles", [
    ({"size": [50, 50]}, ("'size'", "divisible by 4")),
    ({"size": [32, 32]}, ("'size'", "at least 36")),
    ({"size": [48, 48, 48, 48]}, ("'size'", "2 (2D) or 3 (3D)")),
    ({"epochs": 3, "bogus": 1}, ("unknown key 'bogus'",)),
    ({"epochs": "three"}, ("'epochs'", "integer")),
    ({"learning_rate": "fast"}, ("'learning_rate'", "number")),
    ({"epochs": 0}, ("'epochs'", ">= 1")),
    ({"batch_size": -2}, ("'batch_size'", ">= 1")),
    ({"learning_rate": 0}, ("'learning_rate'", "> 0")),
    ({"learning_rate": -0.1}, ("'learning_rate'", "> 0")),
    ({"normalizer_img": "minmax"}, ("'normalizer_img'", "zero_one")),
    ([1, 2], ("object",)),
])
def test_bad_config_file(data, tmp_path, capsys, cfg, needles):
    path = write(tmp_path / "bad.json", json.dumps(cfg))
    out = tmp_path / "o"
    args = train_args(data, out)
    args[args.index("--config") + 1] = str(path)
    for flag in ("--epochs", "--batch_size"):  # the file's values, not overrides
        del args[args.index(flag):args.index(flag) + 2]
    user_error(capsys, args, "bad.json", *needles)
    assert not out.exists()


def test_bad_config_syntax_and_overrides(data, tmp_path, capsys):
    out = tmp_path / "o"
    args = train_args(data, out)
    args[args.index("--config") + 1] = str(write(tmp_path / "broken.json", "{epochs: 3"))
    user_error(capsys, args, "broken.json", "not valid JSON/YAML")
    args[args.index("--config") + 1] = str(tmp_path / "absent.yaml")
    user_error(capsys, args, "absent.yaml", "does not exist")
    for flag, value in (("--epochs", "0"), ("--learning_rate", "-1"), ("--batch_size", "0")):
        user_error(capsys, train_args(data, out, flag, value), flag[2:])
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--loss", "x"], ["--transformation", "rigid"]])
def test_unknown_strategy_or_transformation_is_a_usage_error(data, tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(train_args(data, tmp_path / "o", *argv))
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value, suffix", [(np.nan, ".nii.gz"), (np.inf, ".mha")])
def test_non_finite_image(data, tmp_path, capsys, value, suffix):
    arr = np.ones((48, 48), np.float32)
    arr[5, 7] = value
    bad = write_image(tmp_path / f"nonfinite{suffix}", arr)
    s, _ = first_pair(data)
    out = tmp_path / "o"
    args = train_args(data, out, "--loss", "u")
    args[args.index("--train") + 1] = str(csv_of(tmp_path / "p.csv", [(s, bad)]))
    del args[args.index("--train_seg"):args.index("--train_seg") + 2]
    user_error(capsys, args, bad.name, "NaN or Inf")
    assert not out.exists()


@pytest.mark.parametrize("norm", ["zero_one", "zero_mean_unit_var", "range_matching"])
def test_constant_image_with_dividing_normaliser(data, tmp_path, capsys, norm):
    flat = write_image(tmp_path / "flat.nii.gz", np.full((48, 48), 7, np.float32))
    s, _ = first_pair(data)
    cfg = write(tmp_path / "c.json", json.dumps({"size": [48, 48], "normalizer_img": norm}))
    out = tmp_path / "o"
    args = train_args(data, out, "--loss", "u")
    args[args.index("--config") + 1] = str(cfg)
    args[args.index("--train") + 1] = str(csv_of(tmp_path / "p.csv", [(s, flat)]))
    del args[args.index("--train_seg"):args.index("--train_seg") + 2]
    user_error(capsys, args, "flat.nii.gz", "constant", norm)
    assert not out.exists()


def test_mask_size_mismatch(data, tmp_path, capsys):
    s, t = first_pair(data)
    small = write_image(tmp_path / "small_mask.nii.gz", np.ones((10, 10), np.float32))
    out = tmp_path / "o"
    args = train_args(data, out, "--loss", "u")
    args[args.index("--train") + 1] = str(csv_of(tmp_path / "p.csv", [(s, t)]))
    del args[args.index("--train_seg"):args.index("--train_seg") + 2]
    args += ["--train_msk", str(csv_of(tmp_path / "m.csv", [(small, small)]))]
    user_error(capsys, args, "small_mask.nii.gz", "masks must match")
    assert not out.exists()


def test_strategy_needing_segmentations(data, tmp_path, capsys):
    out = tmp_path / "o"
    args = train_args(data, out, "--loss", "s")
    del args[args.index("--train_seg"):args.index("--train_seg") + 2]
    user_error(capsys, args, "--train_seg")
    user_error(capsys, train_args(data, out, "--val", str(data / "test.csv")), "--val_seg")
    assert not out.exists()


def test_bad_device(data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists")
    out = tmp_path / "o"
    user_error(capsys, train_args(data, out, "--dev", "cuda:7"), "cuda:7", "no CUDA device")
    user_error(capsys, train_args(data, out, "--dev", "warp9"), "warp9", "not a device")
    assert not out.exists()


def test_reg_checks_test_inputs_before_training(data, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["--config", str(data / "config.json"), "--train", str(data / "train.csv"),
            "--train_seg", str(data / "train.seg.csv"), "--test", str(data / "test.csv"),
            "--test_seg", str(data / "train.seg.csv"), "--out", str(out), "--epochs", "1",
            "--quiet", "--dev", "cpu"]
    user_error(capsys, args, "train.seg.csv", "lists 8 pairs", reg=True)
    assert not out.exists()
    user_error(capsys, ["--out", str(out)], "nothing to do", reg=True)


# ----------------------------------------------------------------------------- outputs


def test_existing_output_is_refused_and_kept(data, trained, tmp_path, capsys):
    out = trained.parent.parent
    ckpt = trained / "checkpoint.pt"
    before = ckpt.read_bytes()
    user_error(capsys, train_args(data, out, epochs=1), "already holds a previous run",
               "--overwrite", "--resume")
    # --overwrite with a bad input deletes nothing: inputs are checked first
    args = train_args(data, out, "--overwrite", epochs=1)
    args[args.index("--train") + 1] = str(tmp_path / "missing.csv")
    user_error(capsys, args, "missing.csv")
    user_error(capsys, train_args(data, out, "--overwrite", "--resume"), "contradict")
    assert ckpt.read_bytes() == before
    # the same for test results
    tout = tmp_path / "t"
    assert main(args_test(data, trained, tout)) == 0
    capsys.readouterr()
    user_error(capsys, args_test(data, trained, tout), "summary.json", "--overwrite")
    user_error(capsys, train_args(data, trained / "checkpoint.pt"), "not a folder")


def test_empty_segmentation_gives_undefined_dice(data, trained, tmp_path, capsys):
    empty = write_image(tmp_path / "empty_seg.nii.gz", np.zeros((48, 48), np.float32))
    segs = csv_of(tmp_path / "seg.csv", [(empty, empty)] * 2)
    out = tmp_path / "o"
    args = args_test(data, trained, out, "--refine", "1")
    args.remove("--no_refine")
    args[args.index("--test_seg") + 1] = str(segs)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Warning" not in err, err
    summary = json.loads((out / "test" / "summary.json").read_text())
    for stage in ("identity", "before_refinement", "after_refinement"):
        assert summary[stage]["dice"] is None
        assert summary[stage]["hd"] is None
    assert "dice" in (out / "test" / "metrics.csv").read_text()


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("extra, needles", [
    (["--loss", "u"], ("strategy (--loss) 'i' (asked: 'u')",)),
    (["--transformation", "bspline"], ("transformation 'affine' (asked: 'bspline')",)),
    (["--config", "SIZE64"], ("size [48, 48] (asked: [64, 64])",)),
    (["--config", "SPACING2"], ("spacing [1.0, 1.0] (asked: [2.0, 2.0])",)),
    (["--config", "3D"], ("dimension 2D (asked: 3D)",)),
    (["--config", "NORM"], ("normalizer_img none (asked: zero_one)",)),
])
def test_checkpoint_of_another_kind_is_refused(data, trained, tmp_path, capsys, extra,
                                               needles):
    configs = {"SIZE64": {"size": [64, 64]}, "SPACING2": {"size": [48, 48], "spacing": [2, 2]},
               "3D": {"size": [48, 48, 48], "spacing": [1, 1, 1]},
               "NORM": {"size": [48, 48], "normalizer_img": "zero_one"}}
    if extra[0] == "--config":
        extra = ["--config", str(write(tmp_path / "c.json", json.dumps(configs[extra[1]])))]
    out = tmp_path / "o"
    user_error(capsys, args_test(data, trained, out, *extra), "does not match", *needles)
    assert not out.exists()


def test_files_that_are_not_istn_checkpoints(data, trained, tmp_path, capsys):
    cases = {}
    cases["random.pt"] = os.urandom(300)
    cases["truncated.pt"] = (trained / "checkpoint.pt").read_bytes()[:5000]
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    for name, needle in (("random.pt", "not a readable istn checkpoint"),
                         ("truncated.pt", "not a readable istn checkpoint"),
                         ("other.pt", "not an istn checkpoint")):
        out = tmp_path / f"o_{name}"
        user_error(capsys, args_test(data, tmp_path / name, out), name, needle)
        assert not out.exists()
    user_error(capsys, args_test(data, tmp_path, tmp_path / "o"), "not found")


def _tampered(trained: Path, tmp_path: Path, change) -> Path:
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    change(state)
    path = tmp_path / "tampered.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("change, needles", [
    (lambda s: s["stn"].update({k: torch.zeros(3) for k in list(s["stn"])[:1]}),
     ("STN weight", "has shape [3]")),
    (lambda s: s["itn"].pop(next(iter(s["itn"]))), ("ITN weights do not fit", "missing")),
    (lambda s: s["meta"].update(strategy="zz"), ("damaged", "unknown strategy 'zz'")),
    (lambda s: s["meta"]["config"].update(size=[30, 30]), ("config", "'size'")),
    (lambda s: s.update(stn=None), ("damaged", "no STN weights")),
    (lambda s: s["meta"].update(scaling={"image": [0.0, -1.0], "seg": [0.0, 1.0]}),
     ("'scaling'", "positive standard deviations")),
    (lambda s: s["meta"].update(scaling={"image": [0.0]}), ("'scaling'", "damaged")),
])
def test_damaged_checkpoint_is_refused_before_loading(data, trained, tmp_path, capsys,
                                                      change, needles):
    path = _tampered(trained, tmp_path, change)
    user_error(capsys, args_test(data, path, tmp_path / "o"), "tampered.pt", *needles)
    assert not (tmp_path / "o").exists()


class _Exploit:
    """Unpickling this runs a shell command (what weights_only=True must prevent)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("how", ["torch.save", "pickle", "inside_checkpoint"])
def test_checkpoint_that_runs_code_is_refused(data, trained, tmp_path, capsys, how):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save({"meta": {"format": "istn-checkpoint"}, "x": _Exploit(marker)}, evil)
    elif how == "pickle":
        evil.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))
    else:
        state = torch.load(trained / "checkpoint.pt", weights_only=True)
        state["extra"]["payload"] = _Exploit(marker)
        torch.save(state, evil)
    assert not marker.exists()
    out = tmp_path / "o"
    user_error(capsys, args_test(data, evil, out), "evil.pt", "not a readable istn checkpoint",
               "unsafe")
    with pytest.raises(IstnError):
        read_checkpoint(evil)
    assert not marker.exists()
    assert not out.exists()


# ----------------------------------------------------------------------------- training


def test_nan_loss_names_epoch_and_batch_and_keeps_the_last_good_checkpoint(
        data, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real = train_mod.step_loss

    def nan_on_third_batch(model, b):
        loss, terms = real(model, b)
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 2, batch 1
            loss = loss * float("nan")
        return loss, terms

    monkeypatch.setattr(train_mod, "step_loss", nan_on_third_batch)
    out = tmp_path / "o"
    line = user_error(capsys, train_args(data, out), "epoch 2, batch 1 of 2", "nan",
                      "checkpoint.pt' (epoch 1) is kept", "--resume")
    assert "learning_rate" in line
    model = out / "train" / "model"
    kept = torch.load(model / "checkpoint.pt", weights_only=True)
    first = torch.load(model / "checkpoint_epoch0001.pt", weights_only=True)
    assert kept["epoch"] == 1
    for k, v in kept["stn"].items():
        assert torch.isfinite(v).all() and torch.equal(v, first["stn"][k])
    assert not list(model.glob(".*"))  # no temporary files left


def test_huge_learning_rate_diverges_with_one_line(data, tmp_path, capsys):
    out = tmp_path / "o"
    user_error(capsys, train_args(data, out, "--learning_rate", "1e30", epochs=2),
               "training diverged at epoch 1, batch", "lower learning_rate")
    assert not (out / "train" / "model" / "checkpoint.pt").exists()


def test_sigint_mid_epoch_saves_and_resume_matches(data, reference, tmp_path, capsys,
                                                    monkeypatch):
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    calls = {"n": 0}
    real = train_mod.step_loss

    def interrupt_in_epoch_3(model, b):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 3, batch 1: Ctrl-C arrives during the batch
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, b)

    monkeypatch.setattr(train_mod, "step_loss", interrupt_in_epoch_3)
    out = tmp_path / "o"
    code = main(train_args(data, out))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1, err
    assert "SIGINT" in err[0] and "epoch 3, batch 1 of 2" in err[0] and "--resume" in err[0]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    state = read_checkpoint(out / "train" / "model")
    assert state["epoch"] == 2 and state["extra"]["batch"] == 1
    monkeypatch.setattr(train_mod, "step_loss", real)
    assert main(train_args(data, out, "--resume")) == 0
    assert calls["n"] == 5
    final = torch.load(out / "train" / "model" / "checkpoint.pt", weights_only=True)
    assert_same_weights(final, reference)
    assert len(json.loads((out / "train" / "history.json").read_text())) == EPOCHS


def test_resume_refuses_other_options(data, reference, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(train_args(data, out, epochs=1)) == 0
    capsys.readouterr()
    user_error(capsys, train_args(data, out, "--resume", "--batch_size", "2"),
               "--resume", "batch_size 4 (asked: 2)")
    user_error(capsys, train_args(data, out, "--resume", "--loss", "e"),
               "strategy (--loss) 'i' (asked: 'e')")
    args = train_args(data, out, "--resume")
    args[args.index("--seed") + 1] = "4"
    user_error(capsys, args, "--seed 3 (asked: 4)")
    # more epochs later is fine, and ends where a longer uninterrupted run ends
    assert main(train_args(data, out, "--resume")) == 0
    assert_same_weights(torch.load(out / "train" / "model" / "checkpoint.pt",
                                   weights_only=True), reference)


def _spawn(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "istn", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.01)


def test_sigterm_subprocess_saves_and_resumes(data, reference, tmp_path):
    out = tmp_path / "o"
    proc = _spawn(train_args(data, out))
    _wait_for(out / "train" / "model" / "checkpoint.pt", proc)
    assert proc.poll() is None, "training finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 143, err
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "--resume" in lines[0], err
    state = read_checkpoint(out / "train" / "model")
    assert state["epoch"] < EPOCHS
    assert main(train_args(data, out, "--resume")) == 0
    assert_same_weights(torch.load(out / "train" / "model" / "checkpoint.pt",
                                   weights_only=True), reference)


def test_sigkill_then_resume_matches_uninterrupted_run(data, reference, tmp_path):
    out = tmp_path / "o"
    proc = _spawn(train_args(data, out))
    _wait_for(out / "train" / "model" / "checkpoint.pt", proc)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = read_checkpoint(out / "train" / "model")["epoch"]
    assert 1 <= done < EPOCHS
    assert main(train_args(data, out, "--resume")) == 0
    final = torch.load(out / "train" / "model" / "checkpoint.pt", weights_only=True)
    assert_same_weights(final, reference)
    assert not list((out / "train" / "model").glob(".*"))


def test_same_seed_same_metrics(data, tmp_path):
    summaries = []
    for name in ("a", "b"):
        out = tmp_path / name
        args = ["--config", str(data / "config.json"), "--train", str(data / "train.csv"),
                "--train_seg", str(data / "train.seg.csv"), "--test", str(data / "test.csv"),
                "--test_seg", str(data / "test.seg.csv"), "--test_points",
                str(data / "test.points.csv"), "--out", str(out), "--epochs", "1",
                "--batch_size", "4", "--refine", "2", "--quiet", "--dev", "cpu", "--seed", "5"]
        assert main_reg(args) == 0
        s = json.loads((out / "test" / "summary.json").read_text())
        s.pop("seconds")
        summaries.append((s, (out / "test" / "metrics.csv").read_text()))
    assert summaries[0] == summaries[1]
    assert summaries[0][0]["after_refinement"]["dice"] is not None


def test_debug_shows_the_traceback(data, tmp_path, capsys):
    args = train_args(data, tmp_path / "o")
    args[args.index("--train") + 1] = str(tmp_path / "missing.csv")
    with pytest.raises(IstnError, match="missing.csv"):
        main([*args, "--debug"])
    proc = _spawn([*args, "--debug"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" in err and "missing.csv" in err


def test_interrupt_without_resume_option_gives_no_resume_hint(tmp_path, capsys, monkeypatch):
    import istn.cli.tools as tools

    def stopped(args):
        raise train_mod.TrainingInterrupted("training stopped by SIGTERM", 143, "; use --resume")

    monkeypatch.setattr(tools, "cmd_synth", stopped)  # a command without --resume (like demo)
    assert main(["synth", "2d", "--out", str(tmp_path / "o")]) == 143
    assert capsys.readouterr().err == "istn: training stopped by SIGTERM\n"


def test_unexpected_error_is_one_line_without_debug(data, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise ZeroDivisionError("simulated bug\nsecond line")

    monkeypatch.setattr(train_mod, "train", boom)
    code = main(train_args(data, tmp_path / "o"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "ZeroDivisionError" in err[0] and "--debug" in err[0]


# ----------------------------------------------------------------------------- properties

# No subnormal floats: refinement (evaluate.refine) sets torch's flush-denormal mode for the
# whole process, and hypothesis refuses to generate subnormals while it is on.
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62),
                     st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),
                     st.text(max_size=8))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
_KEYS = st.one_of(st.sampled_from(sorted(Config.__dataclass_fields__)), st.text(max_size=10))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_property_config_dicts_raise_only_istn_errors(data):
    try:
        cfg = from_dict(data)
    except IstnError:
        return
    assert isinstance(cfg, Config)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80), st.sampled_from([".json", ".yaml"]))
def test_property_config_files_raise_only_istn_errors(text, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"c{suffix}"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_config(path)
        except IstnError:
            pass


_CELLS = st.one_of(st.text(max_size=12), st.sampled_from(
    ["src", "trg", "a.png", "/", "", " ", "\x00", "../", "..", '"q"', "b.nii.gz"]))
_HEADERS = st.sampled_from(["src,trg", "src,trg,extra", "trg,src", "", "\ufeffsrc,trg",
                            "src;trg", "src"])
_CSV = st.tuples(_HEADERS, st.lists(st.lists(_CELLS, max_size=4), max_size=4)).map(
    lambda t: t[0] + "\n" + "\n".join(",".join(row) for row in t[1]))


@settings(max_examples=100, deadline=None)
@given(st.one_of(_CSV, st.binary(max_size=60).map(lambda b: b.decode("latin-1"))))
def test_property_pair_csvs_raise_only_istn_errors(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "pairs.csv"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            pairs = read_pair_csv(path)
        except IstnError:
            return
        assert pairs and all(len(p) == 2 for p in pairs)


_IMAGE = st.tuples(st.lists(st.integers(1, 6), min_size=1, max_size=3),
                   st.sampled_from(["f4", "u1", "i2", "f8"]),
                   st.sampled_from(["random", "nan", "inf", "constant"]),
                   st.sampled_from([".nii.gz", ".mha", ".png", ".nrrd"]),
                   st.integers(1, 3))


@settings(max_examples=50, deadline=None)
@given(st.lists(_IMAGE, min_size=2, max_size=3),
       st.sampled_from(["none", "zero_one", "zero_mean_unit_var", "range_matching",
                        "threshold_zero"]))
def test_property_images_raise_only_istn_errors(images, norm):
    cfg = from_dict({"size": [36, 36], "normalizer_img": norm, "normalizer_seg": norm})
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        names = []
        for i, (shape, dtype, kind, suffix, comps) in enumerate(images):
            rng = np.random.default_rng(i)
            arr = rng.uniform(0, 100, [*shape, *([comps] if comps > 1 else [])]).astype(dtype)
            if kind == "constant":
                arr[...] = 3
            elif kind in ("nan", "inf") and dtype.startswith("f"):
                arr.flat[0] = np.nan if kind == "nan" else np.inf
            path = d / f"im{i}{suffix}"
            try:
                sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=comps > 1), str(path))
            except RuntimeError:  # a format that cannot hold this image: a corrupt file
                path.write_bytes(b"not an image")
            names.append(path.name)
        rows = [(names[i], names[(i + 1) % len(names)]) for i in range(len(names))]
        csv_of(d / "pairs.csv", rows)
        csv_of(d / "segs.csv", rows[::-1])
        try:
            ps = load_pairs(cfg, d / "pairs.csv", d / "segs.csv", d / "segs.csv")
        except IstnError:
            return
        assert ps.src.shape == (len(rows), 1, 36, 36) and torch.isfinite(ps.src).all()


# Edge cases found by the property tests above, pinned one by one.

def test_edge_config_with_mixed_key_types():
    with pytest.raises(IstnError):
        from_dict({1: 2, "bogus": 3})


def test_edge_config_with_huge_integers():
    with pytest.raises(IstnError):
        from_dict({"learning_rate": 10**400})


def test_edge_config_with_non_finite_scalars():
    for key in ("learning_rate", "max_translation", "max_rotation", "smoothness"):
        with pytest.raises(IstnError):
            from_dict({key: math.inf})
        with pytest.raises(IstnError):
            from_dict({key: math.nan})


def test_edge_csv_with_overlong_path(tmp_path):
    with pytest.raises(IstnError):
        read_pair_csv(write(tmp_path / "p.csv", "src,trg\n" + "x" * 300 + ",b.png\n"))


def test_edge_4d_image(tmp_path):
    path = write_image(tmp_path / "four.mha", np.ones((2, 3, 4, 5)))
    with pytest.raises(IstnError):
        load_pairs(from_dict({"size": [36, 36]}),
                   csv_of(tmp_path / "p.csv", [(path, path)]))


def test_dead_stn_layer_is_detected():
    """A dead encoder layer (all ReLUs below zero) is named; a healthy model has none."""
    import torch

    from istn.config import from_dict
    from istn.engine.evaluate import predict
    from istn.engine.model import Model
    from istn.engine.train import dead_layers, param_spread

    torch.manual_seed(0)
    model = Model.build(from_dict({"size": [64, 64]}), "i", "affine")
    heads = (model.stn.head.translation, model.stn.head.rotation)
    for head in heads:  # non-identity, input-dependent
        torch.nn.init.normal_(head.weight, std=0.5)
    src, trg = torch.rand(4, 1, 64, 64) * 255, torch.rand(4, 1, 64, 64) * 255
    assert dead_layers(model, src, trg) == []
    assert param_spread(predict(model, src, trg)[0]) > 1e-4
    with torch.no_grad():
        model.stn.encoder.net[3].bias.fill_(-1e9)  # the second conv: every output < 0
    assert dead_layers(model, src, trg) == ["stn.encoder.net.4"]
    params = predict(model, src, trg)[0]
    assert param_spread(params) < 1e-7  # one transformation for all pairs
    assert param_spread(params[:1]) == float("inf")  # one pair says nothing

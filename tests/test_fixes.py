"""Every command does what it says: the cases of the issue, one test (or more) each.

Each test failed before its fix; the README's Troubleshooting table has a row for each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import user_error
from istn.cli import main, main_reg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(small_synth2d: Path) -> Path:
    return small_synth2d


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


# ------------------------------------------------------- 2: register --overwrite replaces all


@pytest.fixture(scope="module")
def regsetup(tmp_path_factory) -> Path:
    """An untrained affine STN-u model folder, two 2D images and a label map."""
    import torch

    from istn.config import load_config
    from istn.engine.checkpoint import save_checkpoint
    from istn.engine.model import Model

    d = tmp_path_factory.mktemp("reg")
    cfg = load_config(None, {"size": [48, 48], "spacing": [1.0, 1.0], "refine": 0})
    torch.manual_seed(0)
    (d / "model").mkdir()
    save_checkpoint(Model.build(cfg, "u", "affine"), d / "model" / "checkpoint.pt")
    rng = np.random.default_rng(0)
    for name in ("s", "t"):
        sitk.WriteImage(sitk.GetImageFromArray(rng.random((50, 52)).astype(np.float32)),
                        str(d / f"{name}.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray((rng.random((50, 52)) > 0.5).astype(np.uint8)),
                    str(d / "seg.nii.gz"))
    return d


def register_args(d: Path, out: Path, *extra: str) -> list[str]:
    return ["register", "--model", str(d / "model"), "--source", str(d / "s.nii.gz"),
            "--target", str(d / "t.nii.gz"), "--out", str(out), "--quiet", "--dev", "cpu",
            *extra]


def test_register_overwrite_replaces_the_whole_result_set(regsetup, tmp_path, capsys):
    out = tmp_path / "reg"
    assert main(register_args(regsetup, out, "--source-seg", str(regsetup / "seg.nii.gz"))) == 0
    (out / "displacement.nii.gz").write_bytes(b"an earlier B-spline run's field")
    (out / "notes.txt").write_text("the user's own file")
    assert main(register_args(regsetup, out, "--overwrite")) == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert "warped_source_seg.nii.gz" not in names and "displacement.nii.gz" not in names
    assert {"warped_source.nii.gz", "transform.tfm", "notes.txt"} <= names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg"]  # no staging left behind


def test_register_failing_midway_keeps_the_old_result_set(regsetup, tmp_path, capsys,
                                                           monkeypatch):
    import errno

    import istn.report

    out = tmp_path / "reg"
    assert main(register_args(regsetup, out, "--source-seg", str(regsetup / "seg.nii.gz"))) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(istn.report, "registration_figure", full_disk)
    swapped = register_args(regsetup, out, "--overwrite")  # other files than the first run's
    swapped[swapped.index("--source") + 1] = str(regsetup / "t.nii.gz")
    swapped[swapped.index("--target") + 1] = str(regsetup / "s.nii.gz")
    assert main(swapped) == 2
    assert "No space left" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg"]


# ----------------------------------------------------------- 3: unique pair names in istn test


def test_pair_names_are_unique_and_unchanged_when_already_unique():
    from istn.data import pair_names

    assert pair_names([Path("d/a.png"), Path("d/b.nii.gz")]) == ["a", "b"]
    assert pair_names([Path("/x/sub-01/anat/T1w.nii.gz"), Path("/x/sub-02/anat/T1w.nii.gz"),
                       Path("/x/sub-02/anat/T2w.nii.gz")]) == \
        ["sub-01_anat_T1w", "sub-02_anat_T1w", "T2w"]
    assert pair_names([Path("a/T1w.png"), Path("a/T1w.png")]) == ["T1w", "T1w_2"]


def test_istn_test_keeps_pairs_with_the_same_file_name_apart(data, regsetup, tmp_path, capsys):
    import csv
    import shutil

    import yaml

    from istn.data import read_pair_csv

    rows, segs = [], []
    for i, ((s, t), (ss, ts)) in enumerate(zip(read_pair_csv(data / "test.csv"),
                                               read_pair_csv(data / "test.seg.csv"),
                                               strict=True)):
        d = tmp_path / f"sub-0{i + 1}" / "anat"
        d.mkdir(parents=True)
        for src, name in ((s, "T1w.png"), (t, "target.png"), (ss, "T1w_seg.png"),
                          (ts, "target_seg.png")):
            shutil.copy(src, d / name)
        rows.append((d / "T1w.png", d / "target.png"))
        segs.append((d / "T1w_seg.png", d / "target_seg.png"))
    for name, rs in (("test.csv", rows), ("test.seg.csv", segs)):
        with open(tmp_path / name, "w", newline="") as f:
            csv.writer(f).writerows([("src", "trg"), *rs])
    out = tmp_path / "OUT"
    assert main(["test", "--model", str(regsetup / "model"), "--test", str(tmp_path / "test.csv"),
                 "--test_seg", str(tmp_path / "test.seg.csv"), "--out", str(out), "--quiet",
                 "--dev", "cpu", "--no_refine"]) == 0, capsys.readouterr().err
    results = yaml.safe_load((out / "test" / "test_results.yml").read_text())
    text = yaml.safe_dump(results)
    assert "sub-01_anat_T1w" in text and "sub-02_anat_T1w" in text
    assert (out / "test" / "sub-01_anat_T1w_warped_src.nii.gz").is_file()
    assert (out / "test" / "sub-02_anat_T1w_warped_src.nii.gz").is_file()


# ---------------------------------------------------------- 4: alpha and colour channels


def test_rgba_png_drops_alpha_and_rgb_warns(tmp_path, capsys):
    from istn.io import as_image, read_image

    grey = np.zeros((9, 11), np.uint8)
    grey[3:6, 4:8] = 200
    rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)
    path = tmp_path / "rgba.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(path))
    arr = sitk.GetArrayFromImage(read_image(path))
    assert arr.min() == 0 and arr.max() == 200  # background stays 0 (not 63.75)
    assert capsys.readouterr().err == ""  # grey stored as RGBA: nothing to say
    la = sitk.GetImageFromArray(np.stack([grey, np.full_like(grey, 255)], -1), isVector=True)
    assert sitk.GetArrayFromImage(as_image(la)).max() == 200
    rgb = np.stack([grey, grey // 2, np.zeros_like(grey)], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.png"))
    read_image(tmp_path / "rgb.png")
    err = capsys.readouterr().err
    assert err.startswith("istn: warning: ") and "rgb.png" in err and "colour" in err


# ------------------------------------------------------------------ 5: degenerate images


@pytest.mark.parametrize("shape", [(1, 20, 20), (20, 1)])
def test_image_one_voxel_thick_is_refused_by_name(regsetup, tmp_path, capsys, shape):
    from istn.errors import IstnError
    from istn.io import as_image, read_image

    path = tmp_path / "thin.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones(shape, np.float32)), str(path))
    with pytest.raises(IstnError, match="thin.nii.gz.*1 voxel thick"):
        read_image(path)
    with pytest.raises(IstnError, match="1 voxel thick"):
        as_image(np.ones(shape, np.float32))
    if len(shape) == 2:
        argv = register_args(regsetup, tmp_path / "o")
        argv[argv.index("--source") + 1] = str(path)
        user_error(capsys, argv, "thin.nii.gz", "1 voxel thick")
        assert not (tmp_path / "o").exists()


# ------------------------------------------------- 6: segmentation size differs in training


def test_training_segmentation_of_another_size_is_refused(data, tmp_path, capsys):
    from istn.data import read_pair_csv

    (s, t), (_, ts) = read_pair_csv(data / "train.csv")[0], read_pair_csv(data / "train.seg.csv")[0]
    small = tmp_path / "small_seg.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((10, 10), np.float32)), str(small))
    (tmp_path / "p.csv").write_text(f"src,trg\n{s},{t}\n")
    (tmp_path / "p.seg.csv").write_text(f"src,trg\n{small},{ts}\n")
    out = tmp_path / "o"
    user_error(capsys, ["train", "--config", str(data / "config.json"), "--train",
                        str(tmp_path / "p.csv"), "--train_seg", str(tmp_path / "p.seg.csv"),
                        "--out", str(out), "--epochs", "1", "--quiet", "--dev", "cpu"],
               "small_seg.nii.gz", str(s), "must match")
    assert not out.exists()


# ----------------------------------------- 7: a points z on 2D, an unknown --pairs column


def test_points_with_z_on_a_2d_transform_are_refused(regsetup, tmp_path, capsys):
    from istn.data import read_points
    from istn.errors import IstnError

    pts = tmp_path / "p.csv"
    pts.write_text("x,y,z\n1,2,3\n")
    with pytest.raises(IstnError, match="p.csv.*x,y,z.*2D"):
        read_points(pts, 2)
    assert read_points(pts, 3).shape == (1, 3)
    tfm = tmp_path / "t.tfm"
    sitk.WriteTransform(sitk.AffineTransform(2), str(tfm))
    user_error(capsys, ["points", "--transform", str(tfm), "--points", str(pts), "--out",
                        str(tmp_path / "o.csv")], "p.csv", "x,y,z")
    assert not (tmp_path / "o.csv").exists()


def test_pairs_csv_with_an_unknown_column_is_refused(regsetup, tmp_path, capsys):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"src,trg,src_segmentation\n{regsetup / 's.nii.gz'},"
                     f"{regsetup / 't.nii.gz'},{regsetup / 'seg.nii.gz'}\n")
    argv = register_args(regsetup, tmp_path / "o")
    for flag in ("--source", "--target"):
        del argv[argv.index(flag):argv.index(flag) + 2]
    user_error(capsys, [*argv, "--pairs", str(pairs)], "pairs.csv", "src_segmentation")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 8: YAML 1.2-style floats


def test_yaml_floats_without_a_dot(tmp_path):
    from istn.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-3\nrefine_learning_rate: 5E-2\nepochs: 3\n"
                    "size: [48, 48]\nspacing: [1.0, 1.0]\n")
    cfg = load_config(path)
    assert cfg.learning_rate == 1e-3 and cfg.refine_learning_rate == 5e-2 and cfg.epochs == 3


# ------------------------------------------------------------------------ 9: "1 pair"


def test_messages_say_1_pair_and_1_epoch(data, regsetup, tmp_path, capsys):
    from istn.data import read_pair_csv

    (s, t), (ss, ts) = read_pair_csv(data / "train.csv")[0], read_pair_csv(
        data / "train.seg.csv")[0]
    (tmp_path / "p.csv").write_text(f"src,trg\n{s},{t}\n")
    (tmp_path / "p.seg.csv").write_text(f"src,trg\n{ss},{ts}\n")
    assert main(["train", "--config", str(data / "config.json"), "--train",
                 str(tmp_path / "p.csv"), "--train_seg", str(tmp_path / "p.seg.csv"),
                 "--out", str(tmp_path / "o"),
                 "--epochs", "1", "--batch_size", "1", "--quiet", "--dev", "cpu"]) == 0
    assert " on 1 pair (1 epoch, batch 1)" in capsys.readouterr().out
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"src,trg\n{regsetup / 's.nii.gz'},{regsetup / 't.nii.gz'}\n")
    assert main(["register", "--model", str(regsetup / "model"), "--pairs", str(pairs), "--out",
                 str(tmp_path / "r"), "--quiet", "--dev", "cpu"]) == 0
    assert "registered 1 pair;" in capsys.readouterr().out


# ----------------------------------------------- 10: a pickle that runs code, said plainly


class _RunsCode:
    def __reduce__(self):
        import os

        return os.system, ("true",)


def test_checkpoint_that_runs_code_says_so_without_torchs_advice(tmp_path, capsys):
    import torch

    from istn.engine.checkpoint import read_checkpoint
    from istn.errors import IstnError

    evil = tmp_path / "evil.pt"
    torch.save({"meta": {"format": "istn-checkpoint"}, "x": _RunsCode()}, evil)
    with pytest.raises(IstnError) as e:
        read_checkpoint(evil)
    assert "evil.pt" in str(e.value) and "loading it would run code" in str(e.value)
    assert "system" in str(e.value) and "weights_only" not in str(e.value)


# ------------------------------------- 11: PNG outputs, names without extension, full disks


def apply_args(regsetup: Path, tmp_path: Path, out: str) -> list[str]:
    tfm = tmp_path / "t.tfm"
    sitk.WriteTransform(sitk.AffineTransform(2), str(tfm))
    return ["apply", "--transform", str(tfm), "--input", str(regsetup / "s.nii.gz"),
            "--reference", str(regsetup / "t.nii.gz"), "--out", str(tmp_path / out)]


def test_apply_writes_png_with_a_warning_when_values_are_rounded(regsetup, tmp_path, capsys):
    assert main(apply_args(regsetup, tmp_path, "x.png")) == 0
    err = capsys.readouterr().err
    assert err.startswith("istn: warning: ") and "x.png" in err and "rounded" in err
    img = sitk.ReadImage(str(tmp_path / "x.png"))
    assert img.GetPixelID() == sitk.sitkUInt8 and img.GetSize() == (52, 50)
    # label maps with values that fit: written as they are, without a word
    assert main([*apply_args(regsetup, tmp_path, "labels.png"), "--labels"]) == 0
    assert capsys.readouterr().err == ""


def test_apply_output_without_or_with_an_unknown_extension(regsetup, tmp_path, capsys):
    user_error(capsys, apply_args(regsetup, tmp_path, "x"), f"'{tmp_path / 'x'}'",
               "no file extension")
    line = user_error(capsys, apply_args(regsetup, tmp_path, "x.foo"), f"'{tmp_path / 'x.foo'}'")
    assert "/.x-" not in line  # the temporary file is never named
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.tfm"]


def test_full_disk_during_training_is_one_line(data, tmp_path, capsys, monkeypatch):
    import errno

    import torch

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "o"
    line = user_error(capsys, ["train", "--config", str(data / "config.json"), "--train",
                               str(data / "train.csv"), "--train_seg", str(data / "train.seg.csv"),
                               "--out", str(out), "--epochs", "1", "--batch_size", "4",
                               "--quiet", "--dev", "cpu"], "No space left on device",
                      str(out / "train" / "model"))
    assert "/.checkpoint" not in line


# ------------------------------------------------ 12: --resume with other data of that size


def test_resume_refuses_other_data_of_the_same_size(data, tmp_path, capsys):
    from istn.data import read_pair_csv

    def args(csv: Path, seg: Path, *extra: str) -> list[str]:
        return ["train", "--config", str(data / "config.json"), "--train", str(csv),
                "--train_seg", str(seg), "--out", str(tmp_path / "o"), "--batch_size", "4",
                "--quiet", "--dev", "cpu", *extra]

    assert main(args(data / "train.csv", data / "train.seg.csv", "--epochs", "1")) == 0
    for name in ("train.csv", "train.seg.csv"):  # the same files, source and target swapped
        rows = read_pair_csv(data / name)
        (tmp_path / name).write_text("src,trg\n" + "".join(f"{t},{s}\n" for s, t in rows))
    user_error(capsys, args(tmp_path / "train.csv", tmp_path / "train.seg.csv", "--epochs", "2",
                            "--resume"), "--resume", "checkpoint.pt", "other training data")
    capsys.readouterr()
    assert main(args(data / "train.csv", data / "train.seg.csv", "--epochs", "2",
                     "--resume")) == 0


# --------------------------------------------------------- 13: one training per --out


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(data / "config.json"), "--train", str(data / "train.csv"),
            "--train_seg", str(data / "train.seg.csv"), "--out", str(out), "--epochs", "1",
            "--batch_size", "4", "--quiet", "--dev", "cpu", *extra]


def test_second_training_into_the_same_out_is_refused(data, tmp_path, capsys):
    import socket
    import subprocess

    out = tmp_path / "o"
    assert main(_train(data, out)) == 0
    assert not (out / "train" / "train.lock").exists()  # released at the end
    before = sorted(p.name for p in (out / "train" / "model").iterdir())
    other = subprocess.Popen(["sleep", "60"])  # a live process holds the lock
    try:
        (out / "train" / "train.lock").write_text(f"{other.pid} {socket.gethostname()}\n")
        capsys.readouterr()
        user_error(capsys, _train(data, out, "--overwrite"), f"'{out / 'train'}'",
                   "in use by another training")
        assert sorted(p.name for p in (out / "train" / "model").iterdir()) == before
    finally:
        other.kill()
        other.wait()
    # its process is gone: the stale lock is taken over with a warning
    assert main(_train(data, out, "--overwrite")) == 0
    err = capsys.readouterr().err
    assert "istn: warning: taking over the stale lock" in err and str(other.pid) in err
    assert not (out / "train" / "train.lock").exists()


# ------------------------------------------------------------------- 14: help and spellings


def _help(argv: list[str], capsys, reg: bool = False) -> str:
    with pytest.raises(SystemExit):
        (main_reg if reg else main)([*argv, "--help"])
    return capsys.readouterr().out


def test_test_help_lists_only_what_testing_uses(capsys):
    text = _help(["test"], capsys)
    for flag in ("--epochs", "--batch_size", "--seed", "--val_interval", "(default affine)",
                 "(default i)"):
        assert flag not in text, flag
    assert "--refine" in text and "--model" in text and "the model's" in text
    assert "--epochs" in _help(["train"], capsys) and "--seed" in _help([], capsys, reg=True)


def test_options_take_both_spellings(capsys):
    from istn.cli import main_parser
    from istn.cli.train import reg_parser

    p = main_parser()
    a = p.parse_args(["train", "--train", "t", "--train-seg", "s", "--val_seg", "v", "--out",
                      "o", "--save-temp"])
    assert (a.train_seg, a.val_seg, a.save_temp) == ("s", "v", True)
    a = p.parse_args(["register", "--model", "m", "--source_seg", "x", "--seg_threshold", "0.5",
                      "--out", "o", "--target-seg", "y"])
    assert (a.source_seg, a.target_seg, a.seg_threshold) == ("x", "y", 0.5)
    a = reg_parser().parse_args(["--out", "o", "--test-points", "q", "--no-refine"])
    assert (a.test_points, a.no_refine) == ("q", True)
    assert p.parse_args(["train", "--train", "t", "--out", "o", "--save"]).save_temp  # abbreviated
    assert "--train_seg TRAIN_SEG" in _help(["train"], capsys)  # the README's spelling shown
    assert "--source-seg SOURCE_SEG" in _help(["register"], capsys)


def test_register_of_another_dimension_does_not_hint_at_training_options(regsetup, tmp_path,
                                                                         capsys):
    vol = tmp_path / "vol.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((20, 20, 20))
                                           .astype(np.float32)), str(vol))
    argv = register_args(regsetup, tmp_path / "o")
    argv[argv.index("--source") + 1] = argv[argv.index("--target") + 1] = str(vol)
    line = user_error(capsys, argv, "3D", "istn register: a model trained on 3D images")
    assert not (tmp_path / "o").exists() and "istn train/test" in line

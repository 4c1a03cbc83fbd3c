"""`istn register` / `apply` / `points`: bad inputs give one line, exit 2, no outputs."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from istn.cli import main
from istn.config import load_config
from istn.engine.checkpoint import save_checkpoint
from istn.engine.model import Model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("regerr")
    cfg = load_config(None, {"size": [48, 48], "spacing": [1.0, 1.0], "refine": 1})
    torch.manual_seed(0)
    model = Model.build(cfg, "u", "affine")
    (d / "model").mkdir()
    save_checkpoint(model, d / "model" / "checkpoint.pt")
    rng = np.random.default_rng(0)
    for name, shape in (("s", (50, 52)), ("t", (50, 52)), ("small", (20, 20)),
                        ("vol", (40, 40, 40))):
        sitk.WriteImage(sitk.GetImageFromArray(rng.random(shape).astype(np.float32)),
                        str(d / f"{name}.nii.gz"))
    lab = sitk.GetImageFromArray((rng.random((50, 52)) > 0.5).astype(np.uint8))
    sitk.WriteImage(lab, str(d / "seg.nii.gz"))
    (d / "p2.csv").write_text("x,y\n1,2\n3,4\n")
    (d / "p1.csv").write_text("x,y\n1,2\n")
    return d


def run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def register(d, out, *extra):
    return ["register", "--model", str(d / "model"), "--source", str(d / "s.nii.gz"),
            "--target", str(d / "t.nii.gz"), "--out", str(out), "--quiet", *extra]


@pytest.mark.parametrize("case, needle", [
    ("missing_model", "nope"),
    ("not_checkpoint", "not a readable istn checkpoint"),
    ("missing_source", "missing.nii.gz"),
    ("3d_source", "3D"),
    ("seg_size", "small.nii.gz"),
    ("points_count", "different numbers"),
    ("one_points_file", "both --source-points and --target-points"),
    ("no_target", "--target"),
])
def test_register_bad_inputs(setup, tmp_path, capsys, case, needle):
    d = setup
    out = tmp_path / "out"
    argv = register(d, out)
    if case == "missing_model":
        argv[2] = str(tmp_path / "nope")
    elif case == "not_checkpoint":
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
        argv[2] = str(bad)
    elif case == "missing_source":
        argv[4] = str(tmp_path / "missing.nii.gz")
    elif case == "3d_source":
        argv[4] = str(d / "vol.nii.gz")
    elif case == "seg_size":
        argv += ["--source-seg", str(d / "small.nii.gz")]
    elif case == "points_count":
        argv += ["--source-points", str(d / "p2.csv"), "--target-points", str(d / "p1.csv")]
    elif case == "one_points_file":
        argv += ["--source-points", str(d / "p2.csv")]
    elif case == "no_target":
        argv = argv[:5] + argv[7:]
    code, err = run(capsys, argv)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert "Traceback" not in err[0]
    assert not (out / "warped_source.nii.gz").exists()
    assert not out.exists() or not any(out.iterdir())


def test_register_refuses_existing_output(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(register(setup, out)) == 0
    before = (out / "warped_source.nii.gz").stat().st_mtime_ns
    code, err = run(capsys, register(setup, out))
    assert code == 2 and "--overwrite" in err[0]
    assert (out / "warped_source.nii.gz").stat().st_mtime_ns == before
    assert main(register(setup, out, "--overwrite")) == 0


def test_register_pairs_csv_errors(setup, tmp_path, capsys):
    bad = tmp_path / "pairs.csv"
    bad.write_text("source,target\na,b\n")
    code, err = run(capsys, ["register", "--model", str(setup / "model"), "--pairs", str(bad),
                             "--out", str(tmp_path / "o")])
    assert code == 2 and "pairs.csv" in err[0] and "src,trg" in err[0]
    bad.write_bytes(b"src,trg\n\xff\xfe\x00bad\n")
    code, err = run(capsys, ["register", "--model", str(setup / "model"), "--pairs", str(bad),
                             "--out", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1


def test_apply_and_points_bad_inputs(setup, tmp_path, capsys):
    img = str(setup / "s.nii.gz")
    code, err = run(capsys, ["apply", "--transform", str(tmp_path / "no.tfm"), "--input", img,
                             "--reference", img, "--out", str(tmp_path / "o.nii.gz")])
    assert code == 2 and "no.tfm" in err[0]
    code, err = run(capsys, ["apply", "--transform", img, "--input", img,
                             "--reference", img, "--out", str(tmp_path / "o.nii.gz")])
    assert code == 2 and "not a displacement field" in err[0]
    tfm = tmp_path / "t.tfm"
    sitk.WriteTransform(sitk.AffineTransform(2), str(tfm))
    bad = tmp_path / "pts.csv"
    bad.write_text("a,b\n1,2\n")
    code, err = run(capsys, ["points", "--transform", str(tfm), "--points", str(bad),
                             "--out", str(tmp_path / "m.csv")])
    assert code == 2 and "x,y" in err[0]
    assert not (tmp_path / "m.csv").exists()
    code, err = run(capsys, ["apply", "--transform", str(tfm), "--input",
                             str(setup / "vol.nii.gz"), "--reference", img,
                             "--out", str(tmp_path / "o.nii.gz")])
    assert code == 2 and "2D" in err[0] and not (tmp_path / "o.nii.gz").exists()

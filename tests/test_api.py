"""The README's Python section runs as written, and the API registers in memory."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import istn
from istn.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def python_section() -> str:
    """The code block of the README's '## Python' section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_public_names():
    assert set(istn.__all__) >= {"load_model", "register", "register_many", "train"}
    assert set(istn.__all__) <= set(dir(istn))


def test_readme_python_section_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "2d", "--out", "data2d", "--pairs", "8", "--val", "0", "--test", "2",
                 "--size", "64", "64"]) == 0
    code = re.sub(r"epochs=\d+", "epochs=2", python_section())  # fewer epochs, as written else
    ns: dict = {}
    exec(compile(code, "README.md#python", "exec"), ns)
    result, again = ns["result"], ns["again"]
    warped = sitk.GetArrayFromImage(result.warped)
    assert warped.shape == sitk.GetArrayFromImage(ns["fixed"]).shape
    np.testing.assert_allclose(sitk.GetArrayFromImage(again), warped,
                               atol=1e-3 * float(np.abs(warped).max()))
    p = np.array([20.0, 30.0])
    back = np.array(result.inverse.TransformPoint(result.transform.TransformPoint(p.tolist())))
    np.testing.assert_allclose(back, p, atol=1e-6)
    assert 0 <= result.metrics["labels"]["1"]["dice"] <= 1
    assert len(ns["results"]) == 2


def test_in_memory_images_register_without_touching_the_disk(tmp_path, monkeypatch):
    d = tmp_path / "d"
    assert main(["synth", "2d", "--out", str(d), "--pairs", "4", "--val", "0", "--test", "1",
                 "--size", "48", "48"]) == 0
    assert main(["train", "--config", str(d / "config.json"), "--loss", "u",
                 "--train", str(d / "train.csv"), "--out", str(tmp_path / "r"),
                 "--epochs", "1", "--quiet"]) == 0
    model = istn.load_model(tmp_path / "r" / "train" / "model", device="cpu")
    src = sitk.ReadImage(str(d / "test" / "V_square_source1.png"), sitk.sitkFloat32)
    trg = sitk.ReadImage(str(d / "test" / "V_square_target1.png"), sitk.sitkFloat32)
    empty = tmp_path / "cwd"
    empty.mkdir()
    monkeypatch.chdir(empty)
    cache = tmp_path / "cache"
    monkeypatch.setenv("ISTN_CACHE_DIR", str(cache))
    res = istn.register(model, source=src, target=trg, refine=3)
    arr = istn.register(model, source=sitk.GetArrayFromImage(src),
                        target=sitk.GetArrayFromImage(trg), refine=3)
    assert not list(empty.iterdir()) and not cache.exists()
    # a numpy array has unit geometry, as these PNGs do: the same registration
    np.testing.assert_allclose(sitk.GetArrayFromImage(arr.warped),
                               sitk.GetArrayFromImage(res.warped), atol=1e-4)
    # warp=False: the same transform, nothing warped, no overlap metrics
    seg = sitk.ReadImage(str(d / "test" / "V_square_source1_seg.png"))
    bare = istn.register(model, source=src, target=trg, refine=3, warp=False,
                         source_seg=seg, target_seg=seg)
    assert bare.warped is None and bare.warped_seg is None and "labels" not in bare.metrics
    p = [10.0, 20.0]
    np.testing.assert_allclose(bare.transform.TransformPoint(p), res.transform.TransformPoint(p),
                               atol=1e-9)

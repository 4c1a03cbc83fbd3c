"""Multi-label SoI (config 'labels', 'soi_components'), the Dice similarity and 'soi_loss'.

Data are generated here: a 2D scene of a disc (label 1) and a bar (label 2) that move
together by a random rigid transform per image; the image shows both (different grey
values), so registering the images aligns both structures.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from cli_helpers import user_error
from istn.cli import main
from istn.config import Config, from_dict
from istn.data import load_pairs
from istn.engine.checkpoint import load_model, save_checkpoint
from istn.engine.model import Model
from istn.errors import IstnError
from istn.losses import training_loss
from istn.metrics import label_overlap_metrics, overlap_metrics
from istn.similarity import new_similarity

SIZE = 48


# ----------------------------------------------------------------------------- data

def scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image, label map) [SIZE, SIZE]: template structures moved by a random rigid map."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    labels = np.zeros((SIZE, SIZE), np.uint8)
    labels[(yy - 20) ** 2 + (xx - 18) ** 2 <= 7 ** 2] = 1
    labels[27:33, 22:36] = 2
    angle = rng.uniform(-0.3, 0.3)
    shift = rng.uniform(-4, 4, 2)
    c, s = math.cos(angle), math.sin(angle)
    mat = np.array([[c, -s], [s, c]])
    centre = np.array([SIZE / 2, SIZE / 2])
    offset = centre - mat @ centre + shift
    moved = ndimage.affine_transform(labels, mat, offset, order=0)
    image = np.choose(moved, [0.0, 200.0, 110.0])
    image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0, 5, image.shape)
    return image.astype(np.float32), moved.astype(np.uint8)


def write_set(folder: Path, split: str, pairs: int, seed: int) -> None:
    """``split.csv`` and ``split.seg.csv`` (label maps as PNG) in ``folder``."""
    rng = np.random.default_rng(seed)
    (folder / split).mkdir(parents=True, exist_ok=True)
    rows_img, rows_seg = [], []
    for i in range(pairs):
        names = []
        for role in ("source", "target"):
            img, lab = scene(rng)
            stem = f"{split}/{role}{i}"
            sitk.WriteImage(sitk.GetImageFromArray(img), str(folder / f"{stem}.nii.gz"))
            sitk.WriteImage(sitk.GetImageFromArray(lab), str(folder / f"{stem}_seg.png"))
            names.append(stem)
        rows_img.append([f"{n}.nii.gz" for n in names])
        rows_seg.append([f"{n}_seg.png" for n in names])
    for suffix, rows in (("csv", rows_img), ("seg.csv", rows_seg)):
        with open(folder / f"{split}.{suffix}", "w", newline="") as f:
            csv.writer(f).writerows([["src", "trg"], *rows])


@pytest.fixture(scope="module")
def two_labels(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("twolabels")
    write_set(d, "train", 24, seed=0)
    write_set(d, "test", 6, seed=1)
    cfg = {"size": [SIZE, SIZE], "spacing": [1, 1], "batch_size": 4, "labels": [1, 2]}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def cfg2(**kw) -> Config:
    return from_dict({"size": [SIZE, SIZE], "spacing": [1, 1], **kw})


# ----------------------------------------------------------------------- similarity

def test_dice_matches_a_hand_computation():
    x = torch.tensor([[1.0, 0.5], [0.0, 0.0]])
    y = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # 2 * (1 + 0.5) / ((1 + 0.25) + (1 + 1 + 1)) = 3 / 4.25
    dice_a = 3 / 4.25
    # second channel: identical maps -> 1; third: both empty -> 1 (eps / eps)
    warped = torch.stack([x, y, torch.zeros(2, 2)])[None]
    target = torch.stack([y, y, torch.zeros(2, 2)])[None]
    got = new_similarity("dice").per_pair(warped, target)
    want = 1 - (dice_a + 1 + 1) / 3
    assert got.shape == (1,)
    assert got.item() == pytest.approx(want, abs=1e-6)
    # binary maps: the binary Dice; scale-invariant (SoI in 0..255 units)
    a = (torch.rand(2, 1, 9, 7) > 0.5).float()
    b = (torch.rand(2, 1, 9, 7) > 0.5).float()
    binary = [overlap_metrics(a[i, 0], b[i, 0], [1, 1])["dice"] for i in range(2)]
    np.testing.assert_allclose(1 - new_similarity("dice").per_pair(a, b).numpy(), binary,
                               rtol=1e-5)
    np.testing.assert_allclose(new_similarity("dice").per_pair(255 * a, 255 * b).numpy(),
                               new_similarity("dice").per_pair(a, b).numpy(), rtol=1e-5)
    # a mask restricts the sums to its voxels
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0, :] = 1
    got = new_similarity("dice").per_pair(x[None, None], y[None, None], mask)
    assert got.item() == pytest.approx(1 - 3 / (1.25 + 2), abs=1e-6)


def test_sums_and_per_channel_means():
    a, b = torch.rand(3, 2, 10, 12), torch.rand(3, 2, 10, 12)
    mse, dice = new_similarity("mse"), new_similarity("dice")
    both = new_similarity("mse+dice")
    np.testing.assert_allclose(both.per_pair(a, b).numpy(),
                               (mse.per_pair(a, b) + dice.per_pair(a, b)).numpy(), rtol=1e-6)
    assert both.mean(a, b).item() == pytest.approx((F.mse_loss(a, b) + dice.mean(a, b)).item())
    # every measure: the mean over channels of each channel's value
    for name in ("mse", "lncc", "mi", "dice"):
        sim = new_similarity(name)
        per = torch.stack([sim.per_pair(a[:, c:c + 1], b[:, c:c + 1]) for c in range(2)])
        np.testing.assert_allclose(sim.per_pair(a, b).numpy(), per.mean(0).numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------------- metrics

def test_label_overlap_metrics_per_label_and_mean():
    rng = np.random.default_rng(0)
    pred = (rng.random((2, 12, 14)) > 0.6).astype(float)
    ref = (rng.random((2, 12, 14)) > 0.6).astype(float)
    assert label_overlap_metrics(pred[:1], ref[:1], [1, 2], None) == overlap_metrics(
        pred[0], ref[0], [1, 2])
    got = label_overlap_metrics(pred, ref, [1, 2], ["1", "5"])
    for k, name in enumerate(["1", "5"]):
        for m, v in overlap_metrics(pred[k], ref[k], [1, 2]).items():
            assert got[f"{m}_{name}"] == v
    assert got["dice"] == pytest.approx((got["dice_1"] + got["dice_5"]) / 2)
    # a label empty in both maps: undefined for it, the mean is that of the others
    pred[1] = ref[1] = 0
    got = label_overlap_metrics(pred, ref, [1, 2], ["1", "5"])
    assert math.isnan(got["dice_5"]) and got["dice"] == got["dice_1"]


# -------------------------------------------------------------------------- config

@pytest.mark.parametrize("value, needle", [
    ([1, 1], "each label value once"), ([], "non-empty list"), ("1,2", "non-empty list"),
    ([1.5], "integer label values"), ([-1], ">= 0")])
def test_config_labels_errors_name_the_key(value, needle):
    with pytest.raises(IstnError, match=f"key 'labels'.*{needle}"):
        cfg2(labels=value)


def test_config_soi_keys():
    assert cfg2().soi_channels == 1 and cfg2().soi_names is None
    c = cfg2(labels=[2, 1])
    assert c.soi_channels == 2 and c.soi_names == ["2", "1"]
    assert cfg2(soi_components=3).soi_names == ["1", "2", "3"]
    assert cfg2(soi_loss="mse+dice", similarity="dice").soi_loss == "mse+dice"
    with pytest.raises(IstnError, match="key 'soi_components'"):
        cfg2(labels=[1], soi_components=2)
    with pytest.raises(IstnError, match="key 'soi_loss'.*'dise' is no registered"):
        cfg2(soi_loss="mse+dise")
    with pytest.raises(IstnError, match="key 'similarity'.*'foo'"):
        cfg2(similarity="foo")


# ---------------------------------------------------------------------------- data

def test_label_map_becomes_one_hot_channels(two_labels):
    ps = load_pairs(cfg2(labels=[2, 1]), two_labels / "test.csv", two_labels / "test.seg.csv")
    assert ps.src_seg.shape == (6, 2, SIZE, SIZE) and ps.src.shape == (6, 1, SIZE, SIZE)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(two_labels / "test/source0_seg.png")))
    # unit spacing, same grid: the channels are the one-hot maps themselves
    np.testing.assert_allclose(ps.src_seg[0, 0].numpy(), lab == 2, atol=1e-5)
    np.testing.assert_allclose(ps.src_seg[0, 1].numpy(), lab == 1, atol=1e-5)
    single = load_pairs(cfg2(), two_labels / "test.csv", two_labels / "test.seg.csv")
    assert single.src_seg.shape == (6, 1, SIZE, SIZE)
    np.testing.assert_allclose(single.src_seg[0, 0].numpy(), lab, atol=1e-5)


def test_probability_maps_as_components(tmp_path, two_labels):
    """Several probability maps: one multi-component image per SoI, 'soi_components'."""
    rows = [["src", "trg"]]
    for i in range(2):
        names = []
        for role in ("source", "target"):
            lab = sitk.GetArrayFromImage(sitk.ReadImage(
                str(two_labels / f"test/{role}{i}_seg.png")))
            maps = [ndimage.gaussian_filter((lab == v).astype(np.float32), 1) for v in (1, 2)]
            img = sitk.Compose([sitk.GetImageFromArray(m) for m in maps])
            sitk.WriteImage(img, str(tmp_path / f"{role}{i}.nii.gz"))
            names.append(str(tmp_path / f"{role}{i}.nii.gz"))
        rows.append(names)
    with open(tmp_path / "prob.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with open(tmp_path / "img.csv", "w", newline="") as f:
        csv.writer(f).writerows([["src", "trg"], *[[str(two_labels / f"test/{r}{i}.nii.gz")
                                                     for r in ("source", "target")]
                                                    for i in range(2)]])
    ps = load_pairs(cfg2(soi_components=2), tmp_path / "img.csv", tmp_path / "prob.csv")
    assert ps.src_seg.shape == (2, 2, SIZE, SIZE)
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "source0.nii.gz")))
    np.testing.assert_allclose(ps.src_seg[0].numpy(), np.moveaxis(first, -1, 0), atol=1e-5)
    with pytest.raises(IstnError, match="2 component.*'soi_components' is 3"):
        load_pairs(cfg2(soi_components=3), tmp_path / "img.csv", tmp_path / "prob.csv")
    with pytest.raises(IstnError, match="components per voxel but config key 'labels'"):
        load_pairs(cfg2(labels=[1, 2]), tmp_path / "img.csv", tmp_path / "prob.csv")


def test_label_errors(tmp_path, two_labels):
    with pytest.raises(IstnError, match=r"'labels' lists \[7\] but no segmentation"):
        load_pairs(cfg2(labels=[1, 7]), two_labels / "test.csv", two_labels / "test.seg.csv")
    # a soft map is no label map
    with pytest.raises(IstnError, match="not a label map.*'labels'"):
        load_pairs(cfg2(labels=[1]), two_labels / "test.csv", two_labels / "test.csv")


def test_cli_labels_not_present_exits_2(tmp_path, two_labels, capsys):
    cfg = json.loads((two_labels / "config.json").read_text())
    (tmp_path / "c.json").write_text(json.dumps({**cfg, "labels": [1, 3]}))
    user_error(capsys, ["train", "--config", str(tmp_path / "c.json"), "--loss", "i",
                        "--train", str(two_labels / "train.csv"),
                        "--train_seg", str(two_labels / "train.seg.csv"),
                        "--out", str(tmp_path / "out"), "--epochs", "1", "--quiet"],
               "'labels' lists [3]", "train/source0_seg.png")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- model

@pytest.mark.parametrize("strategy", ["u", "s", "e", "i"])
@pytest.mark.parametrize("soi_loss", [None, "dice", "mse+dice"])
def test_every_strategy_trains_on_two_channels(strategy, soi_loss):
    torch.manual_seed(0)
    model = Model(cfg2(labels=[1, 2], soi_loss=soi_loss), strategy, "affine")
    if model.itn is not None:
        assert model.itn.out.out_channels == 2
    assert model.stn.encoder.net[0].in_channels == (4 if strategy in "ei" else 2)
    img = torch.rand(2, 1, SIZE, SIZE)
    seg = (torch.rand(2, 2, SIZE, SIZE) > 0.5).float()
    b = {"src": img, "trg": img.flip(-1), "src_seg": seg, "trg_seg": seg.flip(-1)}
    loss, terms = model(b)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.stn.parameters())
    if soi_loss == "dice" and strategy == "s":  # the term is the Dice of the warped SoI
        grid = model.stn.grid(model.params(img, img.flip(-1)))
        want = training_loss("s", grid, img, img.flip(-1), img, img.flip(-1), seg,
                             seg.flip(-1), soi=new_similarity("dice"))[0]
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_default_model_is_unchanged_and_old_checkpoints_load(tmp_path):
    """A model without the new keys (an older checkpoint's config) loads as before."""
    torch.manual_seed(0)
    model = Model(cfg2(), "i", "affine")
    assert model.itn.out.weight.shape == (1, 2, 3, 3)
    assert model.stn.encoder.net[0].in_channels == 2
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(model, path)
    state = torch.load(path, weights_only=True)
    for key in ("labels", "soi_components", "soi_loss"):
        del state["meta"]["config"][key]  # as written before these keys existed
    torch.save(state, path)
    loaded, _ = load_model(path)
    assert loaded.cfg.soi_channels == 1 and loaded.cfg.labels is None
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded.params(*loaded.primes(x, x.flip(-1))),
                           model.params(*model.primes(x, x.flip(-1))))
    # a multi-label model records its labels and needs them to be tested
    multi = Model(cfg2(labels=[1, 2]), "i", "affine")
    save_checkpoint(multi, tmp_path / "multi.pt")
    again, state = load_model(tmp_path / "multi.pt")
    assert state["meta"]["config"]["labels"] == [1, 2] and again.itn.out.out_channels == 2
    with pytest.raises(IstnError, match=r"labels \[1, 2\] \(asked: None\)"):
        load_model(tmp_path / "multi.pt", cfg=cfg2())


# ---------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_multilabel_istn_i_beats_no_registration_per_label(tmp_path, two_labels):
    """ISTN-i on two labels with the Dice term (MSE + Dice), 30 epochs of 24 pairs."""
    d, out = two_labels, tmp_path / "run"
    cfg = {**json.loads((d / "config.json").read_text()), "soi_loss": "mse+dice"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "config.json"), "--loss", "i",
                 "--train", str(d / "train.csv"), "--train_seg", str(d / "train.seg.csv"),
                 "--out", str(out), "--epochs", "30", "--quiet", "--seed", "0"]) == 0
    info = json.loads((out / "train" / "model" / "model.json").read_text())
    assert info["config"]["labels"] == [1, 2] and info["config"]["soi_loss"] == "mse+dice"
    assert main(["test", "--model", str(out / "train" / "model"), "--test", str(d / "test.csv"),
                 "--test_seg", str(d / "test.seg.csv"), "--out", str(out), "--refine", "30",
                 "--quiet"]) == 0
    s = json.loads((out / "test" / "summary.json").read_text())
    for stage in ("identity", "before_refinement", "after_refinement"):
        labels = s[stage]["labels"]
        assert set(labels) == {"1", "2"}
        assert s[stage]["dice"] == pytest.approx(
            np.mean([labels[n]["dice"] for n in "12"]), abs=1e-9)  # every pair has both
    for n in "12":
        assert s["after_refinement"]["labels"][n]["dice"] > s["identity"]["labels"][n]["dice"]
    with open(out / "test" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"dice", "dice_1", "dice_2", "hd95_2", "recall_1"} <= set(rows[0])
    assert len(rows) == 3 * 6
    html = (out / "test" / "report.html").read_text()
    assert "Dice 1" in html and "Dice 2" in html
    assert (out / "test" / "pairs.png").stat().st_size > 0
    seg = sitk.ReadImage(str(next((out / "test").glob("*_warped_seg_refined.nii.gz"))))
    assert seg.GetNumberOfComponentsPerPixel() == 2

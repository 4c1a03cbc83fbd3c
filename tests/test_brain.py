"""The MNI152 brain set (istn.brain) and the scoring of its benchmark (istn.bench_brain)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("nilearn")  # the template ships in the nilearn wheel (the test extra)

from istn import bench_brain as bb  # noqa: E402
from istn import brain  # noqa: E402
from istn.errors import IstnError  # noqa: E402

SPACING = 2.0


@pytest.fixture(scope="module")
def template() -> brain.Template:
    return brain.load_template()


@pytest.fixture(scope="module")
def brain_set(tmp_path_factory, template) -> Path:
    """2 train + 4 test images; seed 5 draws sagittal, coronal, oblique and thick storage."""
    out = tmp_path_factory.mktemp("brain")
    return brain.generate_brain(out, n_train=2, n_test=4, seed=5, spacing=SPACING,
                                p_thick=0.5, p_oblique=0.5, template=template)


def _meta(root: Path) -> dict:
    return json.loads((root / "images.json").read_text())


def _stem(path: Path) -> str:
    return str(path)[: -len(".nii.gz")]


def _gt(pair: bb.Pair) -> sitk.Transform:
    return brain.pair_transform(sitk.ReadTransform(_stem(pair.src) + "_transform.tfm"),
                                sitk.ReadTransform(_stem(pair.trg) + "_transform.tfm"))


# ---------------------------------------------------------------------------- generator


def test_storage_grid_orientations_and_thick_slices():
    centre = np.array([1.0, -17.0, 9.0])
    g = brain.storage_grid("ASL", (2.0, 2.0, 4.0), centre)
    # sagittal storage: i runs anterior (-y), j superior (+z), k left (+x), slices along x
    np.testing.assert_array_equal(g.direction, [[0, 0, 1], [-1, 0, 0], [0, 1, 0]])
    assert g.size == (112, 96, 48) and g.spacing == (2.0, 2.0, 4.0)
    ref = g.reference()
    centre_idx = [(n - 1) / 2 for n in ref.GetSize()]
    np.testing.assert_allclose(ref.TransformContinuousIndexToPhysicalPoint(centre_idx), centre,
                               atol=1e-9)
    assert brain.storage_grid("LPS", (2.0,) * 3, centre).size == (96, 112, 96)
    np.testing.assert_array_equal(brain.storage_grid("RAS", (2.0,) * 3, centre).direction,
                                  np.diag([-1.0, -1.0, 1.0]))
    tilt = brain._random_rotation(np.random.default_rng(0), 5.0)
    ob = brain.storage_grid("LSA", (2.0,) * 3, centre, tilt)
    assert 0 < ob.oblique_deg <= 5.0 and ob.size == (96, 96, 112)
    np.testing.assert_allclose(ob.direction, tilt @ brain._direction("LSA"))


def test_generated_geometry_is_as_documented(brain_set):
    meta = _meta(brain_set)
    test = {k: v for k, v in meta.items() if k.startswith("test/")}
    # the seed is chosen so that the set shows every kind of storage the docstring names
    assert any(v["thick_slices"] for v in test.values())
    assert any(v["oblique_deg"] > 0 for v in test.values())
    assert {v["orientation"][2] for v in test.values()} & {"L", "R"}  # sagittal slices
    for stem, v in meta.items():
        img = sitk.ReadImage(str(brain_set / f"{stem}.nii.gz"))
        assert img.GetPixelID() == sitk.sitkInt16
        d = np.array(img.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(d, np.reshape(v["direction"], (3, 3)), atol=1e-6)
        d0 = brain._direction(v["orientation"])
        # the tilt is a rotation of at most 5 degrees away from the coded direction
        angle = np.degrees(np.arccos(np.clip((np.trace(d @ d0.T) - 1) / 2, -1, 1)))
        assert angle == pytest.approx(v["oblique_deg"], abs=1e-3) and angle <= 5.0 + 1e-6
        want = (SPACING, SPACING, 2 * SPACING if v["thick_slices"] else SPACING)
        if "reoriented_from" not in v:
            np.testing.assert_allclose(img.GetSpacing(), want)
            extent = np.abs(d0).T @ np.array(brain.FOV_MM)
            assert img.GetSize() == tuple(int(n) for n in np.rint(extent / np.array(want)))
        for suffix in ("_seg", "_labels"):
            other = sitk.ReadImage(str(brain_set / f"{stem}{suffix}.nii.gz"))
            assert other.GetSize() == img.GetSize()
            np.testing.assert_allclose(other.GetDirection(), img.GetDirection())
            np.testing.assert_allclose(other.GetOrigin(), img.GetOrigin())
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(brain_set / "test/brain_000_labels.nii.gz")))
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(brain_set / "test/brain_000_seg.nii.gz")))
    assert seg.dtype == np.float32 and 0 <= seg.min() and seg.max() <= 2.0 + 1e-5


def test_reoriented_targets_hold_the_same_voxels(brain_set):
    meta = _meta(brain_set)
    moved = {k: v for k, v in meta.items() if "reoriented_from" in v}
    assert moved
    for stem, v in moved.items():
        orig = sitk.ReadImage(str(brain_set / f"{v['reoriented_from']}.nii.gz"))
        new = sitk.ReadImage(str(brain_set / f"{stem}.nii.gz"))
        assert not np.allclose(orig.GetDirection(), new.GetDirection())  # permuted/flipped
        # same physical content: resampling at the original's voxel centres is exact
        back = sitk.Resample(new, orig, sitk.Transform(), sitk.sitkNearestNeighbor)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(orig))


def test_ground_truth_maps_template_landmarks_exactly(brain_set, template):
    tpl_pts = brain.read_points_csv(brain_set / "template_points.csv")
    assert tpl_pts.shape == (20, 3)
    np.testing.assert_allclose(tpl_pts, template.landmarks, atol=1e-5)
    # the landmarks lie inside the template's tissue and are spread out
    prob = [template.gm.EvaluateAtPhysicalPoint(p.tolist()) +
            template.wm.EvaluateAtPhysicalPoint(p.tolist()) for p in tpl_pts]
    assert min(prob) >= brain.TISSUE_THRESHOLD
    gaps = np.linalg.norm(tpl_pts[:, None] - tpl_pts[None], axis=-1) + np.eye(20) * 1e9
    assert gaps.min() > 20.0
    for stem in _meta(brain_set):
        tx = sitk.ReadTransform(str(brain_set / f"{stem}_transform.tfm"))
        pts = brain.read_points_csv(brain_set / f"{stem}_points.csv")
        np.testing.assert_allclose(bb.map_points(tx, pts), tpl_pts, atol=1e-4)


def test_ground_truth_pair_map_reproduces_target_labels(brain_set):
    meta = _meta(brain_set)
    pairs = bb.read_pairs(brain_set / "pairs.csv") + bb.read_pairs(
        brain_set / "pairs_reoriented.csv")
    checked_iso = 0
    for pair in pairs:
        s = bb.score_pair(_gt(pair), pair)
        assert max(s["tre"]) < 1e-4  # the landmarks correspond exactly
        rel = lambda p: str(p.relative_to(brain_set))[: -len(".nii.gz")]  # noqa: E731
        thick = meta[rel(pair.src)]["thick_slices"] or meta[rel(pair.trg)]["thick_slices"]
        # nearest-neighbour resampling of 2 mm labels leaves ~8 % disagreement at tissue
        # borders; 4 mm slices leave more
        floor = 0.85 if thick else 0.9
        assert s["dice_gm"] > floor and s["dice_wm"] > floor, (pair, s["dice_gm"], s["dice_wm"])
        checked_iso += not thick
        # while no registration is far off
        none = bb.score_pair(sitk.AffineTransform(3), pair)
        assert none["dice_gm"] < 0.8 and np.mean(none["tre"]) > 5.0
    assert checked_iso >= 2


def test_pair_transform_is_target_to_source():
    t_s, t_t = sitk.TranslationTransform(3, (1.0, 2.0, 3.0)), sitk.AffineTransform(3)
    t_t.SetMatrix([2, 0, 0, 0, 1, 0, 0, 0, 1])
    gt = brain.pair_transform(t_s, t_t)
    # x_s = T_s^-1(T_t(x_t)) = (2x - 1, y - 2, z - 3)
    np.testing.assert_allclose(gt.TransformPoint((1.0, 1.0, 1.0)), (1.0, -1.0, -2.0))


def test_csvs_and_config(brain_set):
    from istn.config import load_config
    from istn.data import read_pair_csv

    for split in ("train", "test", "test_reoriented"):
        for suffix in ("csv", "seg.csv", "labels.csv", "points.csv", "transforms.csv"):
            rows = read_pair_csv(brain_set / f"{split}.{suffix}")
            assert len(rows) == (2 if split == "train" else 4)
            assert all(p.is_file() for pair in rows for p in pair)
            assert all(s != t for s, t in rows)
    # istn register --pairs: the columns it accepts, label maps as segmentations
    for name in ("pairs.csv", "pairs_reoriented.csv"):
        lines = (brain_set / name).read_text().splitlines()
        assert lines[0] == "src,trg,src_seg,trg_seg,src_points,trg_points" and len(lines) == 5
        for row in lines[1:]:
            cells = row.split(",")
            assert all((brain_set / c).is_file() for c in cells)
            assert cells[2].endswith("_labels.nii.gz") and cells[4].endswith("_points.csv")
    cfg = load_config(brain_set / "config.json")
    assert cfg.dim == 3 and cfg.normalizer_img == "range_matching"
    assert cfg.max_translation == 0.2
    assert cfg.train_pairing == "random" and cfg.grid_centre == "mass"
    assert cfg.svf_stride == 1 and cfg.smoothness == 0  # deformable keys: nonrigid sets only


def test_reproducible_and_cli(tmp_path, template, monkeypatch):
    a = brain.generate_brain(tmp_path / "a", 0, 2, seed=3, spacing=6.0, template=template)
    b = brain.generate_brain(tmp_path / "b", 0, 2, seed=3, spacing=6.0, template=template)
    for name in ("pairs.csv", "images.json", "test/brain_001_points.csv"):
        assert (a / name).read_text() == (b / name).read_text()
    arr = lambda d: sitk.GetArrayFromImage(sitk.ReadImage(str(d / "test/brain_001.nii.gz")))  # noqa: E731
    np.testing.assert_array_equal(arr(a), arr(b))
    # a rewrite drops the index files of splits it no longer writes, and only those
    (a / "train.csv").write_text("src,trg\nx,y\n")
    (a / "mine.csv").write_text("keep\n")
    brain.generate_brain(a, 0, 2, seed=3, spacing=6.0, template=template)
    assert not (a / "train.csv").exists() and (a / "mine.csv").exists()
    monkeypatch.setattr(brain, "load_template", lambda n=20: template)
    assert brain.main(["--out", str(tmp_path / "c"), "--n-train", "0", "--n-test", "2",
                       "--spacing", "6", "--seed", "3"]) == 0
    assert (tmp_path / "c" / "pairs.csv").read_text() == (a / "pairs.csv").read_text()
    assert brain.main(["--out", str(tmp_path / "d"), "--n-test", "1"]) == 2
    # the same set through `istn synth brain`
    from istn.cli import main

    assert main(["synth", "brain", "--out", str(tmp_path / "e"), "--pairs", "0", "--test", "2",
                 "--seed", "3"]) == 0
    assert (tmp_path / "e" / "config.json").is_file() and (tmp_path / "e" / "test.csv").is_file()
    assert main(["synth", "brain", "--out", str(tmp_path / "f"), "--size", "64", "64"]) == 2


def test_missing_nilearn_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nilearn" else real(name, *a))
    with pytest.raises(IstnError, match=r"pip install istn\[brain\]"):
        brain.template_paths()


def test_nonrigid_deformation(tmp_path, template):
    out = brain.generate_brain(tmp_path, 0, 2, seed=1, spacing=4.0, nonrigid=True,
                               template=template)
    tpl_pts = brain.read_points_csv(out / "template_points.csv")
    for k in range(2):
        stem = out / f"test/brain_{k:03d}"
        tx = sitk.ReadTransform(f"{stem}_transform.h5")
        inv = sitk.ReadTransform(f"{stem}_inverse.h5")
        pts = brain.read_points_csv(f"{stem}_points.csv")
        np.testing.assert_allclose(bb.map_points(tx, pts), tpl_pts, atol=1e-4)
        np.testing.assert_allclose(bb.map_points(inv, tpl_pts), pts, atol=0.1)
        bspline = sitk.CompositeTransform(tx).GetNthTransform(1)
        img = sitk.ReadImage(f"{stem}.nii.gz")
        field = sitk.TransformToDisplacementField(
            bspline, sitk.sitkVectorFloat64, img.GetSize(), img.GetOrigin(), img.GetSpacing(),
            img.GetDirection())
        disp = np.linalg.norm(sitk.GetArrayFromImage(field), axis=-1)
        jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
        assert 0.5 < disp.max() < 6.0 and jac.min() > 0.5  # a few mm, no folding
    pair = bb.read_pairs(out / "pairs.csv")[0]
    gt = brain.pair_transform(sitk.ReadTransform(_stem(pair.src) + "_transform.h5"),
                              sitk.ReadTransform(_stem(pair.trg) + "_transform.h5"),
                              sitk.ReadTransform(_stem(pair.src) + "_inverse.h5"))
    assert max(bb.score_pair(gt, pair)["tre"]) < 0.1
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in brain.BRAIN_DEFORMABLE} == brain.BRAIN_DEFORMABLE


# ------------------------------------------------------------------------------ scoring


def test_warp_labels_by_hand():
    lab = np.zeros((4, 5, 6), np.uint8)  # (z, y, x)
    lab[1, 2, 3] = 2
    img = sitk.GetImageFromArray(lab)
    img.SetSpacing((2.0, 2.0, 2.0))
    # target point p samples the source at p + (2, 0, 0) mm: one voxel further along x
    out = bb.warp_labels(img, img, sitk.TranslationTransform(3, (2.0, 0.0, 0.0)))
    want = np.zeros_like(lab)
    want[1, 2, 2] = 2
    np.testing.assert_array_equal(out, want)


def test_speed_ratios_by_hand():
    row = lambda s: {"seconds_per_pair": s}  # noqa: E731
    summary = {"test": {"none": row(0.0), "simpleitk": row(5.0), "ants": row(6.0),
                        "elastix": row(2.0), "istn": row(0.5)},
               "reoriented": {"none": row(0.0), "istn": row(0.4)}}
    assert bb.speed_ratios(summary) == {"test": ("elastix", 2.0, 0.25)}


def test_dice_by_hand():
    a, b = np.array([1, 1, 0, 2, 2]), np.array([1, 0, 0, 2, 2])
    assert bb.dice(a, b, 1) == pytest.approx(2 / 3)
    assert bb.dice(a, b, 2) == 1.0
    assert np.isnan(bb.dice(a, b, 3))


def test_tre_and_summary_by_hand():
    trg = np.array([[0.0, 0, 0], [10, 0, 0], [0, 5, 5]])
    errors = bb.tre(sitk.TranslationTransform(3, (1.0, 2.0, 2.0)), trg, trg)
    np.testing.assert_allclose(errors, [3.0, 3.0, 3.0])
    s = bb.summarise(np.arange(11.0))
    assert s == {"mean": 5.0, "median": 5.0, "p90": 9.0}
    with pytest.raises(IstnError, match="corresponding"):
        bb.tre(sitk.Transform(3, sitk.sitkIdentity), trg, trg[:2])


def test_aggregate_table_and_istn_transforms(tmp_path):
    rows = [{"dice_gm": 0.5, "dice_wm": 0.7, "tre": [1.0, 3.0], "seconds": 2.0},
            {"dice_gm": 0.7, "dice_wm": 0.9, "tre": [5.0], "seconds": 4.0}]
    agg = bb.aggregate(rows)
    assert agg["dice_gm"] == pytest.approx(0.6) and agg["tre_mean"] == pytest.approx(3.0)
    assert agg["tre_median"] == 3.0 and agg["seconds_per_pair"] == 3.0 and agg["pairs"] == 2
    table = bb.markdown_table({"test": {"none": agg}})
    assert "| test | none | 0.600 | 0.800 | 3.00 | 3.00 |" in table
    for i in range(2):
        (tmp_path / f"{i:04d}_brain_{i:03d}").mkdir()
        tx = sitk.AffineTransform(3)
        tx.SetTranslation((float(i), 0.0, 0.0))
        sitk.WriteTransform(tx, str(tmp_path / f"{i:04d}_brain_{i:03d}" / "transform.tfm"))
    got = bb.istn_transforms(tmp_path, 2)
    assert got[1].TransformPoint((0.0, 0.0, 0.0)) == pytest.approx((1.0, 0.0, 0.0))
    with pytest.raises(IstnError):
        bb.istn_transforms(tmp_path, 3)


# ---------------------------------------------------------------------------- baselines


def _quality(method, brain_set: Path) -> None:
    pair = bb.read_pairs(brain_set / "pairs.csv")[1]
    none = bb.score_pair(sitk.AffineTransform(3), pair)
    tx, seconds = method(pair.src, pair.trg, 1, 0)
    got = bb.score_pair(tx, pair)
    assert seconds > 0
    assert np.mean(got["tre"]) < min(2.0, 0.25 * np.mean(none["tre"]))
    assert got["dice_gm"] > none["dice_gm"] + 0.1


def _istn_refinement(src: Path, trg: Path, threads: int, seed: int):
    """istn's registration with the set's config: an untrained model predicts the
    identity between the images' centred network grids, so this is the refinement's
    own quality (``lm``, 2 levels, locally standardised images) on real anatomy."""
    import time

    import torch

    from istn import api
    from istn.config import load_config
    from istn.engine.model import Model

    torch.manual_seed(seed)
    model = Model.build(load_config(src.parents[1] / "config.json"), "i", "affine")
    model.train(False)
    t0 = time.perf_counter()
    reg = api.register(model, str(src), str(trg), warp=False)
    return reg.transform, time.perf_counter() - t0


def test_istn_refinement_beats_no_registration(brain_set):
    assert json.loads((brain_set / "config.json").read_text())["refine_mode"] == "lm"
    _quality(_istn_refinement, brain_set)


def test_simpleitk_affine_beats_no_registration(brain_set):
    _quality(bb.simpleitk_affine, brain_set)


def test_ants_affine_beats_no_registration(brain_set):
    pytest.importorskip("ants")
    _quality(bb.ants_affine, brain_set)


def test_elastix_affine_beats_no_registration(brain_set):
    pytest.importorskip("itk")
    _quality(bb.elastix_affine, brain_set)


def test_benchmark_writes_json_and_table(brain_set, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bb, "available_methods",
                        lambda nonrigid=False: ({"none": bb.no_registration},
                                                {"simpleitk": "test"}))
    assert bb.main(["--data", str(brain_set), "--out", str(tmp_path), "--skip-istn",
                    "--limit", "1"]) == 0
    report = json.loads((tmp_path / "bench_brain.json").read_text())
    assert set(report["summary"]) == {"test", "reoriented"}
    assert report["summary"]["test"]["none"]["pairs"] == 1
    truth = report["summary"]["reoriented"]["truth"]
    assert truth["tre_p90"] < 1e-4 and truth["dice_gm"] > 0.85
    assert report["skipped"]["istn"] == "--skip-istn"
    out = capsys.readouterr().out
    assert "| reoriented | none |" in out
    assert "fold %" not in out and not report["nonrigid"]  # the affine table as before


# ------------------------------------------------------------------------------ nonrigid


@pytest.fixture(scope="module")
def nonrigid_set(tmp_path_factory, template) -> Path:
    """2 test pairs at 4 mm with the B-spline deformation (no training pairs)."""
    out = tmp_path_factory.mktemp("brain_nr")
    return brain.generate_brain(out, 0, 2, seed=1, spacing=4.0, nonrigid=True,
                                template=template)


def _field(arr: np.ndarray, spacing, direction=None, origin=(3.0, -2.0, 1.0)) -> sitk.Image:
    f = sitk.GetImageFromArray(arr.astype(np.float64), isVector=True)
    f.SetSpacing(spacing)
    f.SetOrigin(origin)
    if direction is not None:
        f.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    return f


def _smooth_field(ref: sitk.Image):
    """A smooth displacement with an analytic Jacobian, sampled at ``ref``'s voxels."""
    from istn.export import grid_points

    p = grid_points(ref)
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    d = np.stack([3 * np.sin(y / 15), 0.002 * x * z, 2 * np.cos(x / 20) + 0.1 * z], 1)
    jac = np.zeros((len(p), 3, 3))
    jac[:, 0, 1] = np.cos(y / 15) / 5
    jac[:, 1, 0], jac[:, 1, 2] = 0.002 * z, 0.002 * x
    jac[:, 2, 0], jac[:, 2, 2] = -np.sin(x / 20) / 10, 0.1
    det = np.linalg.det(np.eye(3) + jac).reshape(ref.GetSize()[::-1])
    return d.reshape(*ref.GetSize()[::-1], 3), det


def test_jacobian_agrees_with_sitk_and_analytic():
    from istn.export import jacobian_determinant

    ref = sitk.Image([30, 24, 20], sitk.sitkUInt8)
    ref.SetSpacing((1.0, 1.5, 2.0))
    ref.SetOrigin((3.0, -2.0, 1.0))
    disp, det = _smooth_field(ref)
    field = _field(disp, ref.GetSpacing())
    ours = jacobian_determinant(field)
    theirs = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    inner = (slice(1, -1),) * 3  # both take central differences inside the grid
    np.testing.assert_allclose(ours[inner], theirs[inner], atol=1e-6)
    np.testing.assert_allclose(ours[inner], det[inner], atol=2e-3)
    # an oblique grid: sitk's filter ignores the direction; ours matches the analytic det
    c, s_ = np.cos(0.4), np.sin(0.4)
    ref.SetDirection([c, -s_, 0, s_, c, 0, 0, 0, 1])
    disp, det = _smooth_field(ref)
    ours = jacobian_determinant(_field(disp, ref.GetSpacing(), ref.GetDirection()))
    np.testing.assert_allclose(ours[inner], det[inner], atol=2e-3)


def test_deformation_quality_counts_folds_in_the_brain():
    # d_x = A sin(k x) with A k = 2: det = 1 + 2 cos(k x) <= 0 on a third of each period
    n, h = 80, 1.0
    k = 2 * np.pi / 40.0
    x = np.arange(n) * h
    disp = np.zeros((10, 12, n, 3))
    disp[..., 0] = (2 / k) * np.sin(k * x)
    field = _field(disp, (h, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    labels = sitk.Image([n, 12, 10], sitk.sitkUInt8)
    labels.CopyInformation(field)
    arr = np.zeros((10, 12, n), np.uint8)
    arr[:5, :, :] = 2  # the brain: half the slices; the other half would not count
    arr[:5, :, n // 2:] = 1
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(field)
    disp_out = disp.copy()
    disp_out[5:, ..., 0] = 0.0  # outside the brain: no folding
    q = bb.deformation_quality(bb._field_transform(_field(disp_out, (h, 2.0, 2.0),
                                                          origin=(0.0, 0.0, 0.0))), lab)
    # (the first and last columns take one-sided differences)
    assert q["fold_percent"] == pytest.approx(100 / 3, abs=2.5)
    assert q["jacobian_min"] == pytest.approx(-1.0, abs=0.02)
    # an affine map: one determinant everywhere, nothing folded
    aff = sitk.AffineTransform(3)
    aff.SetMatrix([1.1, 0, 0, 0, 0.9, 0, 0, 0, 1.2])
    q = bb.deformation_quality(aff, lab)
    assert q["fold_percent"] == 0.0 and q["jacobian_min"] == pytest.approx(1.188)
    assert q["log_jacobian_std"] == pytest.approx(0.0, abs=1e-9)


def test_nonrigid_set_is_detected(nonrigid_set, brain_set):
    assert bb.is_nonrigid(nonrigid_set) and not bb.is_nonrigid(brain_set)
    names = set(bb.available_methods(nonrigid=True)[0]) | set(
        bb.available_methods(nonrigid=True)[1])
    assert {"ants-syn", "elastix-bspline"} <= names
    assert not {"ants-syn", "elastix-bspline"} & set(bb.available_methods()[0])


def _deformable_quality(method, nonrigid_set: Path, **kwargs) -> dict:
    pair = bb.read_pairs(nonrigid_set / "pairs.csv")[0]
    none = bb.score_pair(sitk.AffineTransform(3), pair)
    tx, seconds = method(pair.src, pair.trg, 1, 0, **kwargs)
    got = bb.score_pair(tx, pair, quality=True)
    assert seconds > 0
    assert np.mean(got["tre"]) < 0.5 * np.mean(none["tre"])
    assert got["dice_gm"] > none["dice_gm"] + 0.1
    assert 0.0 <= got["fold_percent"] < 1.0 and got["jacobian_min"] < 1.5
    return got


def test_ants_syn_beats_no_registration(nonrigid_set):
    pytest.importorskip("ants")
    _deformable_quality(bb.ants_syn, nonrigid_set)


def test_elastix_bspline_beats_no_registration(nonrigid_set):
    pytest.importorskip("itk")
    # the default maps with a coarser, faster B-spline grid (the defaults take ~80 s here)
    got = _deformable_quality(bb.elastix_bspline, nonrigid_set,
                              bspline={"FinalGridSpacingInPhysicalUnits": 40,
                                       "MaximumNumberOfIterations": 32,
                                       "NumberOfSpatialSamples": 1024})
    assert got["log_jacobian_std"] > 0  # a deformation, not an affine map


def test_truth_quality_on_the_nonrigid_set(nonrigid_set):
    from istn.data import read_pair_csv

    pair = bb.read_pairs(nonrigid_set / "pairs.csv")[0]
    s, t = read_pair_csv(nonrigid_set / bb.TRUTH["test"], "transforms")[0]
    q = bb.score_pair(bb.truth_transform(s, t), pair, quality=True)
    assert max(q["tre"]) < 0.1 and q["fold_percent"] == 0.0 and q["jacobian_min"] > 0.3
    assert q["log_jacobian_std"] > 0.005  # the B-spline deformations of both images


def test_nonrigid_benchmark_table(nonrigid_set, tmp_path, monkeypatch, capsys):
    def warp(src, trg, threads=1, seed=0):  # a deformable stand-in: a zero field
        ref = sitk.ReadImage(str(trg))
        zero = sitk.Image(ref.GetSize(), sitk.sitkVectorFloat64, 3)
        zero.CopyInformation(ref)
        return sitk.DisplacementFieldTransform(zero), 0.5

    monkeypatch.setattr(bb, "available_methods", lambda nonrigid=False: (
        {"none": bb.no_registration, **({"ants-syn": warp} if nonrigid else {})}, {}))
    assert bb.main(["--data", str(nonrigid_set), "--out", str(tmp_path), "--skip-istn",
                    "--sets", "test"]) == 0
    out = capsys.readouterr().out
    assert "| set | method | Dice GM | Dice WM | TRE mean | TRE median | TRE p90 | s/pair |" \
        " fold % | min J |" in out
    assert "| test | none |" in out and out.split("| test | none |")[1].split("\n")[0] \
        .endswith(" - | - |")
    report = json.loads((tmp_path / "bench_brain.json").read_text())
    assert report["nonrigid"] and set(report["summary"]) == {"test"}
    syn = report["summary"]["test"]["ants-syn"]
    assert syn["fold_percent"] == 0.0 and syn["jacobian_min"] == pytest.approx(1.0)
    assert report["summary"]["test"]["truth"]["fold_percent"] == 0.0
    # --baselines keeps only those; --no-nonrigid the affine table
    assert bb.main(["--data", str(nonrigid_set), "--out", str(tmp_path), "--skip-istn",
                    "--sets", "test", "--baselines", "none", "--no-nonrigid"]) == 0
    assert "fold %" not in capsys.readouterr().out


def _fake_register_outputs(cmd: list[str], pairs: int = 2) -> None:
    """What ``istn register`` would write for ``cmd``: a translation of i mm per pair i."""
    reg = Path(cmd[cmd.index("--out") + 1])
    for i in range(pairs):
        (reg / f"{i:04d}_pair").mkdir(parents=True, exist_ok=True)
        sitk.WriteTransform(sitk.TranslationTransform(3, (float(i), 0, 0)),
                            str(reg / f"{i:04d}_pair" / "transform.h5"))


def test_istn_options_reach_istn_train(nonrigid_set, tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, env):
        calls.append(cmd)
        if cmd[3] == "register":
            _fake_register_outputs(cmd)
        return 4.0

    def fake_timing(model_dir, pairs, threads, refine=None):  # the in-process call
        z = 0.5 if refine is None else 7.0  # refined: 0.5 mm off the command's; network: 7
        return (1.5 if refine is None else 0.5), [
            sitk.TranslationTransform(3, (float(i), 0, z)) for i in range(len(pairs))]

    monkeypatch.setattr(bb, "_run", fake_run)
    monkeypatch.setattr(bb, "time_registration", fake_timing)
    monkeypatch.setattr(bb, "available_methods", lambda nonrigid=False: ({}, {}))
    assert bb.main(["--data", str(nonrigid_set), "--out", str(tmp_path), "--sets", "test",
                    "--transformation", "affine+svf", "--set", "refine_mode=params",
                    "--set", "refine=200", "--set", "refine_similarity=mi",
                    "--epochs", "3"]) == 0
    train, register = calls
    assert train[train.index("--transformation") + 1] == "affine+svf"
    assert train[train.index("--epochs") + 1] == "3"
    cfg = json.loads(Path(train[train.index("--config") + 1]).read_text())
    base = json.loads((nonrigid_set / "config.json").read_text())
    assert cfg == {**base, "refine_mode": "params", "refine": 200,
                   "refine_similarity": "mi"}
    report = json.loads((tmp_path / "bench_brain.json").read_text())
    assert report["istn"]["transformation"] == "affine+svf"
    assert report["istn"]["overrides"]["refine"] == 200
    istn = report["summary"]["test"]["istn"]
    assert istn["seconds_per_pair"] == 1.5 and "fold_percent" in istn  # read from .h5
    network = report["summary"]["test"]["istn-network"]
    assert network["seconds_per_pair"] == 0.5 and network["tre_mean"] > istn["tre_mean"]
    timing = report["istn"]["timing"]["test"]
    assert timing["command_seconds_per_pair"] == 2.0
    assert timing["max_difference_mm"] == pytest.approx(0.5)
    # a bad key fails before anything runs
    calls.clear()
    assert bb.main(["--data", str(nonrigid_set), "--out", str(tmp_path),
                    "--set", "no_such_key=1"]) == 2
    assert not calls
    with pytest.raises(IstnError, match="KEY=VALUE"):
        bb.parse_overrides(["refine"])
    assert bb.parse_overrides(["size=[8, 8, 8]", "refine_mode=params"]) == {
        "size": [8, 8, 8], "refine_mode": "params"}


def test_example_pairs_cap_shrinks_the_set_and_warns(tmp_path, template, monkeypatch, capsys):
    import istn.config

    monkeypatch.setattr(istn.config, "_warned_caps", set())
    monkeypatch.setenv("ISTN_EXAMPLE_PAIRS", "2")
    out = brain.generate_brain(tmp_path / "b", n_train=3, n_test=3, seed=1, spacing=SPACING,
                               template=template)
    assert len((out / "train.csv").read_text().splitlines()) == 1 + 2
    assert len((out / "pairs.csv").read_text().splitlines()) == 1 + 2
    assert "the brain set's training and test pairs at 2 (ISTN_EXAMPLE_PAIRS)" in \
        capsys.readouterr().err
    monkeypatch.setenv("ISTN_EXAMPLE_PAIRS", "1")  # a derangement needs two images
    with pytest.raises(IstnError, match="ISTN_EXAMPLE_PAIRS"):
        brain.generate_brain(tmp_path / "c", n_train=3, n_test=3, template=template)


def test_an_existing_model_is_scored_without_training(nonrigid_set, tmp_path, monkeypatch):
    """``--model DIR``: no ``istn train``; the model's own transformation and epochs."""
    import types

    import istn.api

    calls = []

    def fake_run(cmd, env):
        calls.append(cmd)
        _fake_register_outputs(cmd)
        return 4.0

    def fake_timing(model_dir, pairs, threads, refine=None):
        calls.append(["timing", str(model_dir)])
        return 1.0, [sitk.TranslationTransform(3, (float(i), 0, 0)) for i in range(len(pairs))]

    fake_model = types.SimpleNamespace(transformation="affine+svf",
                                       cfg=types.SimpleNamespace(epochs=7))
    monkeypatch.setattr(istn.api, "load_model", lambda d: fake_model)
    monkeypatch.setattr(bb, "_run", fake_run)
    monkeypatch.setattr(bb, "time_registration", fake_timing)
    monkeypatch.setattr(bb, "available_methods", lambda nonrigid=False: ({}, {}))
    model = tmp_path / "trained"
    assert bb.main(["--data", str(nonrigid_set), "--out", str(tmp_path / "b"), "--sets",
                    "test", "--model", str(model)]) == 0
    assert [c[3] for c in calls if c[0] != "timing"] == ["register"]  # nothing trained
    register = calls[0]
    assert register[register.index("--model") + 1] == str(model)
    assert all(c[1] == str(model) for c in calls if c[0] == "timing")
    report = json.loads((tmp_path / "b" / "bench_brain.json").read_text())
    assert report["istn"]["transformation"] == "affine+svf" and report["istn"]["epochs"] == 7
    assert report["istn"]["train_seconds"] is None
    assert report["istn"]["model"] == str(model)
    # --set changes training, so it cannot go with --model
    calls.clear()
    assert bb.main(["--data", str(nonrigid_set), "--out", str(tmp_path / "c"), "--model",
                    str(model), "--set", "refine=5"]) == 2
    assert not calls

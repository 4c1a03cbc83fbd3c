"""Registration of new pairs in physical space, exports, apply and points."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from istn.cli import main
from istn.config import load_config
from istn.engine.checkpoint import save_checkpoint
from istn.engine.model import Model
from istn.engine.register import register_pairs
from istn.export import read_transform


def blobs(shape, seed=0, n=6):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(k) for k in shape], indexing="ij")
    img = np.zeros(shape)
    for _ in range(n):
        c = [rng.uniform(0.3 * k, 0.7 * k) for k in shape]
        s = rng.uniform(3.0, 5.0)
        img += 100 * np.exp(-sum((g - ci) ** 2 for g, ci in zip(grids, c, strict=True))
                            / (2 * s * s))
    return img.astype(np.float32)


def oblique_image(arr, spacing, origin, angle):
    """An image with anisotropic spacing, non-zero origin and a rotated direction."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    c, s = math.cos(angle), math.sin(angle)
    if arr.ndim == 2:
        img.SetDirection([c, -s, s, c])
    else:
        img.SetDirection([c, -s, 0, s, c, 0, 0, 0, 1])
    return img


def perturbed_model(dim, transformation, strategy="i"):
    size = [48] * dim
    cfg = load_config(None, {"size": size, "spacing": [1.5] * dim, "refine": 2,
                             "batch_size": 2})
    torch.manual_seed(0)
    model = Model.build(cfg, strategy, transformation)
    if transformation == "affine":  # a clearly non-identity prediction
        with torch.no_grad():
            model.stn.head.translation.bias.fill_(0.5)
            model.stn.head.rotation.bias.fill_(0.3)
            model.stn.head.scaling.bias.fill_(0.4)
            model.stn.head.shearing.bias.fill_(0.1)
    if transformation == "svf":  # zero-initialised: give it a smooth random velocity
        with torch.no_grad():
            model.stn.head.linear.bias.normal_(0.0, 0.25)
    if transformation == "affine+svf":  # both stages away from the identity
        with torch.no_grad():
            model.stn.stages[0].head.translation.bias.fill_(0.3)
            model.stn.stages[0].head.rotation.bias.fill_(0.2)
            model.stn.stages[1].head.linear.bias.normal_(0.0, 0.25)
    return model


def write_pair(tmp_path, dim, labels=False):
    shape = (40, 56) if dim == 2 else (30, 36, 40)
    sp = (1.2, 0.9) if dim == 2 else (1.2, 0.9, 1.6)
    org = (5.0, -3.0) if dim == 2 else (5.0, -3.0, 7.0)
    src = oblique_image(blobs(shape, 1), sp, org, 0.35)
    trg = oblique_image(blobs(shape[::-1] if dim == 2 else shape, 2),
                        sp[::-1] if dim == 2 else sp, org[::-1] if dim == 2 else org, -0.2)
    paths = {k: tmp_path / f"{k}.nii.gz" for k in ("src", "trg", "src_seg", "trg_seg")}
    sitk.WriteImage(src, str(paths["src"]))
    sitk.WriteImage(trg, str(paths["trg"]))
    for key, img in (("src_seg", src), ("trg_seg", trg)):
        a = sitk.GetArrayFromImage(img)
        lab = (a > 20).astype(np.int16) + (a > 60).astype(np.int16) * 2  # labels {0, 1, 3}
        li = sitk.GetImageFromArray(lab)
        li.CopyInformation(img)
        sitk.WriteImage(li, str(paths[key]))
    return paths


def inside_mask(src: sitk.Image, trg: sitk.Image, tx: sitk.Transform) -> np.ndarray:
    """Target voxels whose mapped point lies inside the source's voxel-centre hull.

    ITK treats points up to half a voxel outside as inside (edge value) while
    grid_sample blends with its zero padding; compare only where both interpolate.
    """
    field = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, trg.GetSize(),
                                              trg.GetOrigin(), trg.GetSpacing(),
                                              trg.GetDirection())
    disp = sitk.GetArrayFromImage(field).reshape(-1, trg.GetDimension())
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in trg.GetSize()[::-1]], indexing="ij"))
    idx = idx.reshape(trg.GetDimension(), -1)[::-1].T.astype(float)  # (x, y, z) columns
    d = trg.GetDimension()
    trg_dir = np.array(trg.GetDirection()).reshape(d, d)
    pts = np.array(trg.GetOrigin()) + (idx * trg.GetSpacing()) @ trg_dir.T + disp
    src_dir = np.array(src.GetDirection()).reshape(d, d)
    cidx = np.linalg.solve(src_dir, (pts - src.GetOrigin()).T).T / src.GetSpacing()
    inside = np.all((cidx >= 0) & (cidx <= np.array(src.GetSize()) - 1), axis=1)
    return inside.reshape(trg.GetSize()[::-1])


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("transformation", ["affine", "bspline", "svf", "affine+svf"])
def test_export_reproduces_istn_warp_with_plain_simpleitk(tmp_path, dim, transformation):
    paths = write_pair(tmp_path, dim)
    model = perturbed_model(dim, transformation)
    out = tmp_path / "out"
    [metrics] = register_pairs(model, [(paths["src"], paths["trg"])], [out],
                               torch.device("cpu"), 2,
                               segs=[(paths["src_seg"], paths["trg_seg"])], progress=False)
    name = "transform.tfm" if transformation == "affine" else "displacement.nii.gz"
    tx = read_transform(out / name)
    src, trg = sitk.ReadImage(str(paths["src"])), sitk.ReadImage(str(paths["trg"]))
    ref = sitk.GetArrayFromImage(sitk.Resample(src, trg, tx, sitk.sitkLinear, 0.0))
    ours_img = sitk.ReadImage(str(out / "warped_source.nii.gz"))
    assert ours_img.GetSize() == trg.GetSize()
    assert np.allclose(ours_img.GetDirection(), trg.GetDirection())
    assert np.allclose(ours_img.GetOrigin(), trg.GetOrigin())
    ours = sitk.GetArrayFromImage(ours_img)
    mask = inside_mask(src, trg, tx)
    assert mask.mean() > 0.3  # the transformation keeps much of the source in view
    assert np.abs(ours - ref)[mask].max() < 1e-4 * ref.max()
    # labels survive warping unchanged (no new values)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_source_seg.nii.gz")))
    assert set(np.unique(seg)) <= {0, 1, 3}
    assert set(metrics["labels"]) <= {"1", "3"} and "1" in metrics["labels"]
    # transform.h5 (a composite for cascades) resamples the same; inverse.h5 undoes it
    composite = sitk.ReadTransform(str(out / "transform.h5"))
    ref_h5 = sitk.GetArrayFromImage(sitk.Resample(src, trg, composite, sitk.sitkLinear, 0.0))
    assert np.abs(ours - ref_h5)[mask].max() < 1e-4 * ref.max()
    inverse = sitk.ReadTransform(str(out / "inverse.h5"))
    g = np.stack(np.meshgrid(*[np.linspace(0.3, 0.7, 4) * n for n in trg.GetSize()],
                             indexing="ij"), -1).reshape(-1, dim)
    pts = [trg.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in g]
    back = np.array([inverse.TransformPoint(composite.TransformPoint(p)) for p in pts])
    assert np.abs(back - np.array(pts)).max() < 0.1 * min(trg.GetSpacing())
    if transformation != "affine":
        assert math.isfinite(metrics["jacobian_min"])
        assert 0 <= metrics["jacobian_folding_percent"] <= 100


def test_bspline_identity_has_unit_jacobian(tmp_path):
    paths = write_pair(tmp_path, 2)
    cfg = load_config(None, {"size": [48, 48], "spacing": [1.5, 1.5], "bspline_zero_init": True})
    model = Model.build(cfg, "u", "bspline")
    [m] = register_pairs(model, [(paths["src"], paths["trg"])], [tmp_path / "o"],
                         torch.device("cpu"), 0, progress=False)
    assert m["jacobian_min"] == pytest.approx(1.0, abs=1e-6)
    assert m["jacobian_folding_percent"] == 0.0


def test_known_affine_is_recovered_by_image_based_refinement(tmp_path):
    shape = (64, 64)
    src = sitk.GetImageFromArray(blobs(shape, 5, n=10))
    known = sitk.AffineTransform(2)
    known.SetCenter((31.5, 31.5))
    a = math.radians(4.0)
    known.SetMatrix([math.cos(a), -math.sin(a), math.sin(a), math.cos(a)])
    known.SetTranslation((2.0, -1.5))
    trg = sitk.Resample(src, src, known, sitk.sitkLinear, 0.0)  # trg(p) = src(known(p))
    sitk.WriteImage(src, str(tmp_path / "s.nii.gz"))
    sitk.WriteImage(trg, str(tmp_path / "t.nii.gz"))
    cfg = load_config(None, {"size": [64, 64], "refine_mode": "params",
                             "refine_learning_rate": 0.005})
    model = Model.build(cfg, "u", "affine")  # STN-u: refinement loss MSE(W(S), T)
    register_pairs(model, [(tmp_path / "s.nii.gz", tmp_path / "t.nii.gz")], [tmp_path / "o"],
                   torch.device("cpu"), 300, progress=False)
    tx = sitk.AffineTransform(read_transform(tmp_path / "o" / "transform.tfm"))
    got = np.array(tx.GetMatrix()).reshape(2, 2)
    want = np.array(known.GetMatrix()).reshape(2, 2)
    # stated tolerance: 0.01 on matrix entries, 0.2 px on where points land
    assert np.abs(got - want).max() < 0.01
    pts = [(10.0, 20.0), (50.0, 40.0), (31.5, 31.5)]
    for p in pts:
        assert np.linalg.norm(np.subtract(tx.TransformPoint(p), known.TransformPoint(p))) < 0.2


def _train_tiny(tmp_path, transformation):
    cfg = load_config(None, {"size": [48, 48], "spacing": [1.5, 1.5], "refine": 2})
    model = perturbed_model(2, transformation)
    model.cfg = cfg
    folder = tmp_path / "model"
    folder.mkdir()
    save_checkpoint(model, folder / "checkpoint.pt")
    return folder


@pytest.mark.parametrize("transformation", ["affine", "bspline"])
def test_cli_register_apply_points(tmp_path, transformation):
    paths = write_pair(tmp_path, 2)
    model = _train_tiny(tmp_path, transformation)
    out = tmp_path / "reg"
    assert main(["register", "--model", str(model), "--source", str(paths["src"]),
                 "--target", str(paths["trg"]), "--source-seg", str(paths["src_seg"]),
                 "--target-seg", str(paths["trg_seg"]), "--out", str(out), "--quiet"]) == 0
    for name in ("warped_source.nii.gz", "warped_source_seg.nii.gz", "metrics.json",
                 "report.png"):
        assert (out / name).is_file()
    tname = "transform.tfm" if transformation == "affine" else "displacement.nii.gz"
    tfile = out / tname
    # apply: the exported transform warps the source like istn did
    applied = tmp_path / "applied.nii.gz"
    assert main(["apply", "--transform", str(tfile), "--input", str(paths["src"]),
                 "--reference", str(paths["trg"]), "--out", str(applied)]) == 0
    tx = read_transform(tfile)
    src, trg = sitk.ReadImage(str(paths["src"])), sitk.ReadImage(str(paths["trg"]))
    mask = inside_mask(src, trg, tx)
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(applied)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_source.nii.gz")))
    assert np.abs(a - b)[mask].max() < 1e-3 * b.max()
    # labels through apply --labels keep their values
    lab = tmp_path / "lab.nii.gz"
    assert main(["apply", "--transform", str(tfile), "--input", str(paths["src_seg"]),
                 "--reference", str(paths["trg"]), "--out", str(lab), "--labels"]) == 0
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(lab))))) <= {0, 1, 3}
    # points: same as SimpleITK's TransformPoint; --inverse goes back
    # inside the target, and so are their images: --inverse iterates on the field,
    # which is defined on the target's grid only
    pts = np.array([trg.TransformContinuousIndexToPhysicalPoint(i)
                    for i in [(10, 15), (20, 30), (25, 35)]])
    csv_in = tmp_path / "pts.csv"
    csv_in.write_text("x,y\n" + "\n".join(f"{x},{y}" for x, y in pts) + "\n")
    assert main(["points", "--transform", str(tfile), "--points", str(csv_in),
                 "--out", str(tmp_path / "mapped.csv")]) == 0
    mapped = np.loadtxt(tmp_path / "mapped.csv", delimiter=",", skiprows=1)
    want = np.array([tx.TransformPoint(p.tolist()) for p in pts])
    assert np.abs(mapped - want).max() < 1e-5
    assert np.abs(mapped - pts).max() > 0.05  # the transformation is not the identity
    assert main(["points", "--transform", str(tfile), "--points", str(tmp_path / "mapped.csv"),
                 "--out", str(tmp_path / "back.csv"), "--inverse"]) == 0
    back = np.loadtxt(tmp_path / "back.csv", delimiter=",", skiprows=1)
    assert np.abs(back - pts).max() < 1e-3


def test_cli_register_pairs_csv(tmp_path):
    paths = write_pair(tmp_path, 2)
    model = _train_tiny(tmp_path, "affine")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("src,trg,src_seg,trg_seg\n" + "\n".join(
        f"{paths['src']},{paths['trg']},{paths['src_seg']},{paths['trg_seg']}"
        for _ in range(3)) + "\n")
    out = tmp_path / "many"
    assert main(["register", "--model", str(model), "--pairs", str(pairs), "--out", str(out),
                 "--quiet", "--refine", "1"]) == 0
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("pair,label,dice")
    assert len(rows) == 1 + 3 * 2  # three pairs, labels 1 and 3
    dirs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(dirs) == 3
    first = json.loads((dirs[0] / "metrics.json").read_text())
    assert 0 <= first["labels"]["1"]["dice"] <= 1


def test_jacobian_matches_itk_on_axis_aligned_grid_and_is_one_for_rotations():
    from istn.export import jacobian_determinant

    rng = np.random.default_rng(0)
    disp = rng.normal(0, 0.3, (20, 24, 28, 3))
    from scipy.ndimage import gaussian_filter

    disp = gaussian_filter(disp, (2, 2, 2, 0))
    field = sitk.GetImageFromArray(disp, isVector=True)
    field.SetSpacing((0.8, 1.3, 2.0))
    ours = jacobian_determinant(field)
    itk = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    inner = (slice(1, -1),) * 3  # ITK's border handling differs
    np.testing.assert_allclose(ours[inner], itk[inner], atol=1e-6)
    # a rotation written as a field on an oblique grid has det 1 everywhere
    ref = oblique_image(np.zeros((10, 12, 14), np.float32), (0.8, 1.3, 2.0), (3.0, 1, 2), 0.4)
    rot = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.2, -0.1, 0.3)
    f = sitk.TransformToDisplacementField(rot, sitk.sitkVectorFloat64, ref.GetSize(),
                                          ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection())
    np.testing.assert_allclose(jacobian_determinant(f), 1.0, atol=1e-9)


def test_landmark_error_from_point_csvs_in_test(tmp_path):
    """`istn test` accepts point CSV files in --test_points (rows correspond)."""
    from istn.data import load_pairs
    from istn.engine.evaluate import pair_metrics

    paths = write_pair(tmp_path, 2)
    trg = sitk.ReadImage(str(paths["trg"]))
    t_pts = np.array([trg.TransformContinuousIndexToPhysicalPoint(i)
                      for i in [(10, 20), (30, 40)]])
    s_pts = t_pts + [3.0, 4.0]
    for name, pts in (("s.csv", s_pts), ("t.csv", t_pts)):
        (tmp_path / name).write_text("x,y\n" + "\n".join(f"{x},{y}" for x, y in pts) + "\n")
    for name, a, b in (("pairs.csv", paths["src"], paths["trg"]),
                       ("pts.csv", tmp_path / "s.csv", tmp_path / "t.csv")):
        (tmp_path / name).write_text(f"src,trg\n{a},{b}\n")
    cfg = load_config(None, {"size": [48, 48], "spacing": [1.5, 1.5]})
    ps = load_pairs(cfg, tmp_path / "pairs.csv", points=tmp_path / "pts.csv")
    model = Model.build(cfg, "u", "affine")
    # identity: the points are compared on the network grids (index * spacing)
    [row] = pair_metrics(model, ps, None, None)
    g_s, g_t = ps.src_grid[0], ps.trg_grid[0]
    want = np.linalg.norm((g_s.to_index(s_pts) - g_t.to_index(t_pts)) * 1.5, axis=1).mean()
    assert row["landmark_error"] == pytest.approx(want)


def test_jacobian_statistics_of_a_known_field():
    """d(x) = (c x^2, 0) in physical units: det = 1 + 2 c x inside (central differences)."""
    from istn.export import jacobian_stats

    size, spacing, c = (30, 20), (1.5, 2.0), 0.004
    x = np.arange(size[0]) * spacing[0] + 5.0  # origin 5 mm
    disp = np.zeros((size[1], size[0], 2))
    disp[..., 0] = c * x[None, :] ** 2
    field = sitk.GetImageFromArray(disp, isVector=True)
    field.SetSpacing(spacing)
    field.SetOrigin((5.0, -3.0))
    stats = jacobian_stats(field)
    h = spacing[0]
    det = 1 + 2 * c * x  # one-sided differences at the two border columns:
    det[0], det[-1] = 1 + c * (2 * x[0] + h), 1 + c * (2 * x[-1] - h)
    assert stats["jacobian_min"] == pytest.approx(det.min(), rel=1e-9)
    assert stats["jacobian_folding_percent"] == 0.0
    assert stats["jacobian_log_std"] == pytest.approx(np.log(det).std(), rel=1e-9)

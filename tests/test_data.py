"""Pair CSVs, loading pairs onto the network grid (istn.data) and image I/O (istn.io)."""

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from istn.config import from_dict
from istn.data import Geometry, load_pairs, read_pair_csv
from istn.errors import IstnError
from istn.io import read_image, write_image

CFG2D = from_dict({"size": [48, 48], "spacing": [1, 1]})


def _png(path, arr):
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(arr, np.uint8)), str(path))
    return path


def _nii(path, arr, spacing=None, origin=None, direction=None):
    img = sitk.GetImageFromArray(np.asarray(arr, np.float32))
    if spacing is not None:
        img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(np.asarray(direction, float).ravel().tolist())
    sitk.WriteImage(img, str(path))
    return path


def _csv(path, rows, header="src,trg"):
    lines = ([header] if header is not None else []) + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _rotation_3d(axis, deg):
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = np.deg2rad(deg)
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


# --------------------------------------------------------------------------- read_pair_csv


def test_read_pair_csv_absolute_paths_kept(tmp_path):
    a, b = tmp_path / "x" / "a.png", tmp_path / "y" / "b.nii.gz"
    path = _csv(tmp_path / "pairs.csv", [(a, b), (b, a)])
    assert read_pair_csv(path) == [(a, b), (b, a)]


def test_read_pair_csv_strips_whitespace_and_skips_blank_lines(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    path = tmp_path / "pairs.csv"
    path.write_text(f" src , trg \n\n {a} , {b} \n,\n")
    assert read_pair_csv(path) == [(a, b)]


def test_read_pair_csv_relative_cwd_first_then_csv_folder(tmp_path, monkeypatch):
    work, data = tmp_path / "work", tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    work.mkdir()
    for name in ("a.png", "b.png"):
        (data / name).write_bytes(b"")
    (data / "imgs" / "c.png").write_bytes(b"")
    (work / "a.png").write_bytes(b"")  # exists in both: the working directory wins
    path = _csv(data / "pairs.csv", [("a.png", "b.png"), ("imgs/c.png", "missing.png")])
    monkeypatch.chdir(work)
    got = [[(Path.cwd() / p).resolve() for p in row] for row in read_pair_csv(path)]
    assert got == [
        [(work / "a.png").resolve(), (data / "b.png").resolve()],
        # Not found anywhere: resolved against the CSV folder (so the error names that path).
        [(data / "imgs" / "c.png").resolve(), (data / "missing.png").resolve()],
    ]


def test_read_pair_csv_relative_csv_path_and_relative_entries(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"")
    _csv(tmp_path / "sub" / "pairs.csv", [("a.png", "a.png")])
    monkeypatch.chdir(tmp_path)
    ((s, t),) = read_pair_csv("sub/pairs.csv")
    assert s.resolve() == t.resolve() == (tmp_path / "sub" / "a.png").resolve()


@pytest.mark.parametrize("header", [None, "source,target", "trg,src", "src"])
def test_read_pair_csv_header_required(tmp_path, header):
    path = _csv(tmp_path / "pairs.csv", [("a.png", "b.png")], header=header)
    with pytest.raises(IstnError, match="header") as info:
        read_pair_csv(path, "image")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["", "\n\n", " , \n"])
def test_read_pair_csv_empty(tmp_path, text):
    path = tmp_path / "pairs.csv"
    path.write_text(text)
    with pytest.raises(IstnError, match="empty") as info:
        read_pair_csv(path)
    assert str(path) in str(info.value)


def test_read_pair_csv_header_only(tmp_path):
    path = _csv(tmp_path / "pairs.csv", [])
    with pytest.raises(IstnError, match="no pairs") as info:
        read_pair_csv(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("bad", ["only_one.png", "a.png,", ",b.png"])
def test_read_pair_csv_row_with_one_column_names_line(tmp_path, bad):
    path = tmp_path / "pairs.csv"
    path.write_text(f"src,trg\na.png,b.png\n{bad}\n")
    with pytest.raises(IstnError, match="line 3") as info:
        read_pair_csv(path)
    assert str(path) in str(info.value)


def test_read_pair_csv_line_number_counts_blank_lines(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("src,trg\n\na.png,b.png\n\nonly_one.png\n")
    with pytest.raises(IstnError, match="line 5"):
        read_pair_csv(path)


def test_read_pair_csv_accepts_utf8_bom(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(f"src,trg\n{tmp_path / 'a.png'},{tmp_path / 'b.png'}\n", encoding="utf-8-sig")
    assert read_pair_csv(path) == [(tmp_path / "a.png", tmp_path / "b.png")]


def test_read_pair_csv_missing_file(tmp_path):
    with pytest.raises(IstnError, match="nope.csv"):
        read_pair_csv(tmp_path / "nope.csv", "seg")


def test_read_pair_csv_binary_file(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"\xff\xfe\x00\x81\x9c" * 20)
    with pytest.raises(IstnError) as info:
        read_pair_csv(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- load_pairs


@pytest.fixture
def pairs2d(tmp_path):
    """Three 48x48 PNG pairs with segmentations and landmark images, plus their CSVs."""
    rng = np.random.default_rng(0)
    arrays = {k: [] for k in ("src", "trg", "src_seg", "trg_seg", "src_pts", "trg_pts")}
    rows = {k: [] for k in ("img", "seg", "pts")}
    for i in range(3):
        files = {}
        for side in ("src", "trg"):
            img = rng.integers(1, 255, (48, 48)).astype(np.uint8)
            seg = (rng.random((48, 48)) > 0.6).astype(np.uint8)
            pts = np.zeros((48, 48), np.uint8)
            pts[rng.integers(0, 48, 3), rng.integers(0, 48, 3)] = [1, 2, 3]
            files[side] = _png(tmp_path / f"case{i}_{side}.png", img)
            files[side + "_seg"] = _png(tmp_path / f"case{i}_{side}_seg.png", seg)
            files[side + "_pts"] = _png(tmp_path / f"case{i}_{side}_pts.png", pts)
            arrays[side].append(img)
            arrays[side + "_seg"].append(seg)
            arrays[side + "_pts"].append(pts)
        rows["img"].append((files["src"].name, files["trg"].name))
        rows["seg"].append((files["src_seg"].name, files["trg_seg"].name))
        rows["pts"].append((files["src_pts"].name, files["trg_pts"].name))
    csvs = {k: _csv(tmp_path / f"{k}.csv", v) for k, v in rows.items()}
    return arrays, csvs


def test_load_pairs_2d(pairs2d):
    arrays, csvs = pairs2d
    ps = load_pairs(CFG2D, csvs["img"], segs=csvs["seg"], points=csvs["pts"])
    assert len(ps) == 3
    assert ps.names == ["case0_src", "case1_src", "case2_src"]
    for key, expected in arrays.items():
        t = getattr(ps, key)
        assert isinstance(t, torch.Tensor), key
        assert t.shape == (3, 1, 48, 48), key
        assert t.dtype == torch.float32, key
        np.testing.assert_array_equal(t[:, 0].numpy(), np.stack(expected).astype(np.float32),
                                      err_msg=key)
    assert ps.transforms is None
    assert len(ps.references) == len(ps.src_grid) == len(ps.trg_file) == 3
    ref = ps.references[1]
    assert ref.GetSize() == (48, 48)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ref), arrays["trg"][1])


def test_load_pairs_without_optional_csvs(pairs2d):
    _, csvs = pairs2d
    ps = load_pairs(CFG2D, csvs["img"])
    assert ps.src.shape == ps.trg.shape == (3, 1, 48, 48)
    assert ps.src_seg is None and ps.trg_pts is None


def test_load_pairs_normalises_images_not_landmarks(pairs2d):
    arrays, csvs = pairs2d
    cfg = from_dict({"size": [48, 48], "spacing": [1, 1], "normalizer_img": "zero_mean_unit_var",
                     "normalizer_seg": "threshold_zero"})
    ps = load_pairs(cfg, csvs["img"], segs=csvs["seg"], points=csvs["pts"])
    for i in range(3):
        a = arrays["src"][i].astype(np.float64)
        np.testing.assert_allclose(ps.src[i, 0].numpy(), (a - a.mean()) / a.std(), atol=1e-4)
    np.testing.assert_array_equal(ps.trg_seg[:, 0].numpy(), np.stack(arrays["trg_seg"]) > 0)
    np.testing.assert_array_equal(ps.src_pts[:, 0].numpy(), np.stack(arrays["src_pts"]))


def test_load_pairs_uses_masks_for_statistics(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(50, 100, (48, 48)).astype(np.uint8)
    img[:, :8] = 255  # bright border outside the mask
    mask = np.zeros((48, 48), np.uint8)
    mask[:, 8:] = 1
    _png(tmp_path / "a.png", img)
    _png(tmp_path / "m.png", mask)
    images = _csv(tmp_path / "img.csv", [("a.png", "a.png")])
    masks = _csv(tmp_path / "mask.csv", [("m.png", "m.png")])
    cfg = from_dict({"size": [48, 48], "spacing": [1, 1], "normalizer_img": "zero_one"})
    ps = load_pairs(cfg, images, masks=masks)
    inside = img[:, 8:].astype(np.float64)
    expected = (img - inside.min()) / (inside.max() - inside.min())
    np.testing.assert_allclose(ps.src[0, 0].numpy(), expected, rtol=1e-6)
    assert ps.trg[0, 0, :, 8:].max().item() == pytest.approx(1.0)


def test_load_pairs_resamples_to_config_grid(tmp_path):
    rng = np.random.default_rng(2)
    big = rng.integers(0, 255, (96, 96)).astype(np.uint8)
    _png(tmp_path / "s.png", big)
    _png(tmp_path / "t.png", big[::-1])
    images = _csv(tmp_path / "img.csv", [("s.png", "t.png")])
    ps = load_pairs(from_dict({"size": [48, 48], "spacing": [2, 2]}), images)
    # Output voxel j samples input index 2j + 0.5 (same centre): linear = 2x2 block mean.
    blocks = big.astype(np.float64).reshape(48, 2, 48, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(ps.src[0, 0].numpy(), blocks, atol=1e-4)
    np.testing.assert_allclose(ps.src_grid[0].origin, [0.5, 0.5], atol=1e-9)
    np.testing.assert_allclose(ps.src_grid[0].spacing, [2.0, 2.0])
    assert ps.src_file[0].size == (96, 96)
    assert ps.src_grid[0].size == (48, 48)


def test_load_pairs_parallel_csv_row_count_mismatch(pairs2d, tmp_path):
    _, csvs = pairs2d
    short = _csv(tmp_path / "short_seg.csv", [("case0_src_seg.png", "case0_trg_seg.png")])
    with pytest.raises(IstnError) as info:
        load_pairs(CFG2D, csvs["img"], segs=short)
    msg = str(info.value)
    assert str(short) in msg and str(csvs["img"]) in msg
    assert "1" in msg and "3" in msg


def test_load_pairs_dimension_mismatch(tmp_path):
    _nii(tmp_path / "vol.nii.gz", np.random.default_rng(3).random((6, 7, 8)))
    images = _csv(tmp_path / "img.csv", [("vol.nii.gz", "vol.nii.gz")])
    with pytest.raises(IstnError, match="3D.*2D") as info:
        load_pairs(CFG2D, images)
    assert "vol.nii.gz" in str(info.value)


def _nonfinite_pair_set(tmp_path, ext, bad_value):
    rng = np.random.default_rng(4)
    good = _nii(tmp_path / f"good.{ext}", rng.random((6, 7, 8)))
    arr = rng.random((6, 7, 8))
    arr[2, 3, 4] = bad_value
    bad = _nii(tmp_path / f"bad.{ext}", arr)
    images = _csv(tmp_path / "img.csv", [(good.name, good.name), (good.name, bad.name)])
    cfg = from_dict({"size": [36, 36, 36], "spacing": [1, 1, 1]})
    with pytest.raises(IstnError, match="NaN or Inf") as info:
        load_pairs(cfg, images)
    assert f"bad.{ext}" in str(info.value)
    assert "good" not in str(info.value)


@pytest.mark.parametrize("ext", ["mha", "nrrd"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_load_pairs_non_finite_values_name_file(tmp_path, ext, bad_value):
    _nonfinite_pair_set(tmp_path, ext, bad_value)


@pytest.mark.parametrize("ext", ["nii.gz", "nii"])
def test_load_pairs_nan_in_nifti_names_file(tmp_path, ext):
    _nonfinite_pair_set(tmp_path, ext, np.nan)


def test_load_pairs_mask_of_different_size(tmp_path):
    _png(tmp_path / "a.png", np.random.default_rng(5).integers(0, 255, (48, 48)))
    _png(tmp_path / "m.png", np.ones((40, 48)))
    images = _csv(tmp_path / "img.csv", [("a.png", "a.png")])
    masks = _csv(tmp_path / "mask.csv", [("m.png", "m.png")])
    with pytest.raises(IstnError, match="mask") as info:
        load_pairs(CFG2D, images, masks=masks)
    assert "m.png" in str(info.value)


def test_load_pairs_missing_image(tmp_path):
    _png(tmp_path / "a.png", np.zeros((48, 48)) + 3)
    images = _csv(tmp_path / "img.csv", [("a.png", "gone.png")])
    with pytest.raises(IstnError, match="does not exist") as info:
        load_pairs(CFG2D, images)
    assert str(tmp_path / "gone.png") in str(info.value)


def test_load_pairs_directory_as_image(tmp_path):
    (tmp_path / "folder.png").mkdir()
    images = _csv(tmp_path / "img.csv", [("folder.png", "folder.png")])
    with pytest.raises(IstnError, match="directory") as info:
        load_pairs(CFG2D, images)
    assert str(tmp_path / "folder.png") in str(info.value)


# --------------------------------------------------------------------------- Geometry


def _geometry_image(direction):
    img = sitk.Image([9, 7, 5], sitk.sitkFloat32)
    img.SetSpacing((0.7, 1.3, 2.5))
    img.SetOrigin((10.0, -20.0, 5.5))
    img.SetDirection(np.asarray(direction, float).ravel().tolist())
    return img


def test_geometry_matches_simpleitk_rotated_anisotropic():
    rot = _rotation_3d([0.3, -1.0, 2.0], 52.0)
    img = _geometry_image(rot)
    geo = Geometry.of(img)
    assert geo.size == (9, 7, 5)
    idx = np.random.default_rng(6).uniform(-2, 10, (20, 3))
    phys = geo.to_physical(idx)
    expected = np.array([img.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in idx])
    np.testing.assert_allclose(phys, expected, atol=1e-9)
    np.testing.assert_allclose(geo.to_index(phys), idx, atol=1e-9)
    back = np.array([img.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in phys])
    np.testing.assert_allclose(geo.to_index(phys), back, atol=1e-9)


def test_geometry_from_nifti_file(tmp_path):
    rot = _rotation_3d([1.0, 1.0, 0.0], -25.0)
    path = _nii(tmp_path / "g.nii.gz", np.zeros((5, 7, 9)), (0.7, 1.3, 2.5),
                (10.0, -20.0, 5.5), rot)
    img = read_image(path)
    geo = Geometry.of(img)
    corner = np.array([[8.0, 6.0, 4.0]])
    np.testing.assert_allclose(geo.to_physical(corner)[0],
                               img.TransformContinuousIndexToPhysicalPoint([8.0, 6.0, 4.0]),
                               atol=1e-5)
    np.testing.assert_allclose(geo.direction, rot, atol=1e-5)


def test_geometry_to_index_non_orthogonal_direction():
    direction = np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.2], [0.1, 0.0, 1.0]])
    img = _geometry_image(direction)
    geo = Geometry.of(img)
    idx = np.random.default_rng(7).uniform(0, 5, (6, 3))
    np.testing.assert_allclose(
        geo.to_physical(idx),
        [img.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in idx], atol=1e-9)
    np.testing.assert_allclose(geo.to_index(geo.to_physical(idx)), idx, atol=1e-9)


# --------------------------------------------------------------------------- io


def test_read_image_rgb_png_is_channel_mean(tmp_path):
    rgb = np.random.default_rng(8).integers(0, 256, (11, 13, 3)).astype(np.uint8)
    path = tmp_path / "rgb.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    img = read_image(path)
    assert img.GetNumberOfComponentsPerPixel() == 1
    assert img.GetPixelID() == sitk.sitkFloat32
    assert img.GetSize() == (13, 11)
    expected = (rgb[..., 0].astype(np.float64) + rgb[..., 1] + rgb[..., 2]) / 3
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), expected, rtol=1e-6)


def test_read_image_keeps_geometry_and_casts(tmp_path):
    rot = _rotation_3d([0.0, 0.0, 1.0], 30.0)
    arr = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 1.5, 3.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    img.SetDirection(rot.ravel().tolist())
    sitk.WriteImage(img, str(tmp_path / "v.nii.gz"))
    out = read_image(tmp_path / "v.nii.gz")
    assert out.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), arr)
    np.testing.assert_allclose(out.GetSpacing(), (0.5, 1.5, 3.0), atol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), (1.0, 2.0, 3.0), atol=1e-5)
    np.testing.assert_allclose(out.GetDirection(), rot.ravel(), atol=1e-5)


@pytest.mark.parametrize("name", ["corrupt.png", "corrupt.nii.gz"])
def test_read_image_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(9).integers(0, 256, 300).astype(np.uint8).tobytes())
    with pytest.raises(IstnError, match="cannot be read") as info:
        read_image(path, "target image")
    assert str(path) in str(info.value)
    assert "target image" in str(info.value)


@pytest.mark.parametrize("name", ["out.nii.gz", "out.png", "sub/dir/out.mha"])
def test_write_image_round_trip_without_leftovers(tmp_path, name):
    arr = np.random.default_rng(10).integers(0, 255, (9, 12)).astype(np.uint8)
    img = sitk.GetImageFromArray(arr)
    if not name.endswith(".png"):
        img.SetSpacing((0.5, 2.0))
        img.SetOrigin((4.0, -1.0))
    path = tmp_path / name
    write_image(img, path)
    write_image(img, path)  # overwriting an existing file works too
    assert sorted(os.listdir(path.parent)) == [path.name]
    back = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing())
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin())


def test_write_image_failure_leaves_no_temporary_file(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((4, 4), np.uint8))
    with pytest.raises((RuntimeError, IstnError)):
        write_image(img, tmp_path / "out.unknownformat")
    assert os.listdir(tmp_path) == []


def test_write_image_permissions_follow_umask(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((4, 4), np.uint8))
    old = os.umask(0o022)
    try:
        sitk.WriteImage(img, str(tmp_path / "direct.png"))
        write_image(img, tmp_path / "atomic.png")
    finally:
        os.umask(old)
    direct = os.stat(tmp_path / "direct.png").st_mode & 0o777
    atomic = os.stat(tmp_path / "atomic.png").st_mode & 0o777
    assert direct == 0o644
    assert oct(atomic) == oct(direct)

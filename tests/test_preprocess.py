"""Intensity normalisers and resampling (istn.preprocess) against independent references."""

import numpy as np
import pytest
import SimpleITK as sitk

from istn.errors import IstnError
from istn.preprocess import normalise, resample


def _rng(seed=0):
    return np.random.default_rng(seed)


def _rotation_2d(deg):
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _rotation_3d(axis, deg):
    """Rodrigues' formula (written independently of anything in istn)."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = np.deg2rad(deg)
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


def _image(arr, spacing, origin=None, direction=None):
    img = sitk.GetImageFromArray(np.asarray(arr, np.float32))
    d = img.GetDimension()
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in (origin if origin is not None else [0.0] * d)])
    if direction is not None:
        img.SetDirection(np.asarray(direction, float).ravel().tolist())
    return img


def _centre(img):
    return np.array(img.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2.0 for n in img.GetSize()]))


# --------------------------------------------------------------------------- normalise


def test_none_is_unchanged_float32():
    arr = _rng().integers(0, 255, (7, 9)).astype(np.uint8)
    out = normalise(arr, "none")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, arr.astype(np.float64))


def test_zero_mean_unit_var():
    arr = _rng(1).normal(40.0, 7.0, (20, 30)).astype(np.float32)
    out = normalise(arr, "zero_mean_unit_var")
    a64 = arr.astype(np.float64)
    mu = a64.sum() / a64.size
    sd = np.sqrt(((a64 - mu) ** 2).sum() / a64.size)
    np.testing.assert_allclose(out, (a64 - mu) / sd, rtol=1e-4, atol=1e-4)
    assert abs(float(np.mean(out, dtype=np.float64))) < 1e-4
    assert float(np.std(out, dtype=np.float64)) == pytest.approx(1.0, abs=1e-4)


def test_zero_mean_unit_var_with_mask_uses_masked_statistics():
    arr = _rng(2).normal(10.0, 2.0, (16, 16)).astype(np.float32)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 3:13] = 1
    arr[mask == 0] = 1000.0  # outside the mask: must not influence the statistics
    out = normalise(arr, "zero_mean_unit_var", mask)
    inside = out[mask > 0].astype(np.float64)
    assert abs(inside.mean()) < 1e-4
    assert inside.std() == pytest.approx(1.0, abs=1e-4)
    vals = arr[mask > 0].astype(np.float64)
    np.testing.assert_allclose(out[mask == 0], (1000.0 - vals.mean()) / vals.std(), rtol=1e-4)


def test_range_matching_with_mask_excluding_outliers():
    # Inside the mask: the values 0..100 (101 voxels, shuffled). With linear interpolation
    # the 4th percentile is at sorted position 0.04 * 100 = 4 -> value 4, the 96th at 96.
    rng = _rng(3)
    arr = np.full((11, 12), 0.0, np.float32)
    mask = np.zeros(arr.shape, np.uint8)
    flat_idx = rng.permutation(arr.size)[:101]
    arr.ravel()[flat_idx] = rng.permutation(101).astype(np.float32)
    mask.ravel()[flat_idx] = 1
    outside = mask == 0
    arr[outside] = np.where(rng.random(outside.sum()) < 0.5, -5000.0, 1e5)
    out = normalise(arr, "range_matching", mask)
    expected = (arr.astype(np.float64) - 4.0) / (96.0 - 4.0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert out[arr == 4.0].item() == pytest.approx(0.0, abs=1e-6)
    assert out[arr == 96.0].item() == pytest.approx(1.0, abs=1e-6)


def test_range_matching_without_mask_is_affected_by_outliers():
    arr = np.arange(101, dtype=np.float32)
    out = normalise(arr, "range_matching")
    np.testing.assert_allclose(out, (arr - 4.0) / 92.0, rtol=1e-6, atol=1e-6)


def test_zero_one():
    arr = _rng(4).uniform(-30.0, 70.0, (5, 6, 7)).astype(np.float32)
    out = normalise(arr, "zero_one")
    lo, hi = sorted(arr.ravel())[0], sorted(arr.ravel())[-1]
    np.testing.assert_allclose(out, (arr.astype(np.float64) - lo) / (hi - lo), atol=1e-6)
    assert out.min() == pytest.approx(0.0, abs=1e-7)
    assert out.max() == pytest.approx(1.0, abs=1e-6)


def test_zero_one_with_mask():
    arr = np.array([[-100.0, 2.0, 4.0], [6.0, 10.0, 500.0]], np.float32)
    mask = np.array([[0, 1, 1], [1, 1, 0]])
    out = normalise(arr, "zero_one", mask)
    np.testing.assert_allclose(out, [[-102 / 8, 0.0, 0.25], [0.5, 1.0, 498 / 8]], rtol=1e-6)


def test_threshold_zero():
    arr = np.array([[-2.0, 0.0, 1e-6], [3.0, -0.0, 0.5]], np.float32)
    out = normalise(arr, "threshold_zero")
    np.testing.assert_array_equal(out, [[0, 0, 1], [1, 0, 1]])
    assert out.dtype == np.float32


@pytest.mark.parametrize("kind", ["zero_mean_unit_var", "range_matching", "zero_one"])
@pytest.mark.parametrize("value", [5.0, 0.0, -2.0])
def test_constant_image_is_an_error(kind, value):
    arr = np.full((48, 48), value, np.float32)
    with pytest.raises(IstnError, match="constant") as info:
        normalise(arr, kind, name="image 'x.png'")
    assert "x.png" in str(info.value)


@pytest.mark.parametrize("kind", ["range_matching", "zero_one"])
def test_constant_non_dyadic_image_is_an_error(kind):
    with pytest.raises(IstnError, match="constant"):
        normalise(np.full((48, 48), 0.1, np.float32), kind)


@pytest.mark.parametrize("value", [0.1, 0.3])
def test_constant_non_dyadic_image_zero_mean_unit_var(value):
    arr = np.full((48, 48), value, np.float32)
    with pytest.raises(IstnError, match="constant"):
        out = normalise(arr, "zero_mean_unit_var")
        # What happens instead: a constant image turns into +-1 (or larger) values.
        raise AssertionError(f"no error; output range {out.min()}..{out.max()}")


def test_constant_inside_mask_is_an_error():
    arr = np.arange(16, dtype=np.float32).reshape(4, 4)
    arr[1:3, 1:3] = 7.0
    mask = np.zeros((4, 4))
    mask[1:3, 1:3] = 1
    with pytest.raises(IstnError, match="constant"):
        normalise(arr, "zero_one", mask)


@pytest.mark.parametrize("kind", ["zero_mean_unit_var", "range_matching", "zero_one"])
def test_empty_mask_is_an_error(kind):
    arr = _rng(5).random((8, 8)).astype(np.float32)
    with pytest.raises(IstnError, match="mask is empty") as info:
        normalise(arr, kind, np.zeros((8, 8)), name="image 'a.png'")
    assert "a.png" in str(info.value)


def test_unknown_normaliser_is_an_error():
    with pytest.raises(IstnError, match="z_score"):
        normalise(np.arange(4.0), "z_score")


# --------------------------------------------------------------------------- resample


def test_resample_noop_when_grid_matches():
    img = sitk.GetImageFromArray(_rng(6).integers(0, 255, (30, 40)).astype(np.uint8))
    img.SetSpacing((1.0, 1.0))
    img.SetOrigin((3.0, -2.0))
    out = resample(img, [1, 1], [40, 30])
    assert out is img


@pytest.mark.parametrize(
    "origin, direction",
    [((0.0, 0.0), None), ((12.5, -7.25), _rotation_2d(30.0)), ((-3.0, 4.0), _rotation_2d(-90.0))],
)
def test_resample_downsample_2d_keeps_centre_and_direction(origin, direction):
    arr = _rng(7).random((60, 80)).astype(np.float32)  # size (x=80, y=60)
    img = _image(arr, (0.5, 0.5), origin, direction)
    out = resample(img, [1, 1], [40, 30], orientation="image")

    assert out.GetSize() == (40, 30)
    np.testing.assert_allclose(out.GetSpacing(), (1.0, 1.0))
    np.testing.assert_allclose(out.GetDirection(), img.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(_centre(out), _centre(img), atol=1e-9)
    assert out.GetPixelID() == sitk.sitkFloat32

    # Same field of view, half-voxel shift of origin: o' = o + D @ ((1 - 0.5) / 2, ...).
    d = np.asarray(img.GetDirection()).reshape(2, 2)
    np.testing.assert_allclose(out.GetOrigin(), np.asarray(origin) + d @ [0.25, 0.25],
                               atol=1e-9)

    # Reference grid built by hand, resampled by SimpleITK itself.
    ref = sitk.Image(40, 30, sitk.sitkFloat32)
    ref.SetSpacing((1.0, 1.0))
    ref.SetOrigin(tuple(np.asarray(origin) + d @ [0.25, 0.25]))
    ref.SetDirection(img.GetDirection())
    expected = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(expected),
                               atol=1e-5)

    # Pure numpy: output voxel j samples input index 2j + 0.5, i.e. the 2x2 block mean.
    blocks = arr.astype(np.float64).reshape(30, 2, 40, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), blocks, atol=1e-5)


def test_resample_pads_and_crops_symmetrically():
    arr = _rng(8).random((30, 40)).astype(np.float32)
    img = _image(arr, (1.0, 1.0), (5.0, 6.0), _rotation_2d(45.0))
    bigger = resample(img, [1, 1], [44, 34], orientation="image")
    np.testing.assert_allclose(sitk.GetArrayFromImage(bigger), np.pad(arr, 2), atol=1e-5)
    np.testing.assert_allclose(_centre(bigger), _centre(img), atol=1e-9)
    smaller = resample(img, [1, 1], [36, 26], orientation="image")
    np.testing.assert_allclose(sitk.GetArrayFromImage(smaller), arr[2:-2, 2:-2], atol=1e-5)


def test_resample_pad_value_and_interpolator():
    arr = _rng(9).integers(0, 5, (10, 12)).astype(np.float32)
    img = _image(arr, (1.0, 1.0))
    out = resample(img, [1, 1], [16, 14], interpolator=sitk.sitkNearestNeighbor, pad=-1.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out),
                                  np.pad(arr, 2, constant_values=-1.0))
    # Nearest neighbour at a finer spacing only repeats existing labels.
    fine = resample(img, [0.5, 0.5], [24, 20], interpolator=sitk.sitkNearestNeighbor)
    assert set(np.unique(sitk.GetArrayFromImage(fine))) <= set(np.unique(arr))


def test_resample_3d_rotated_anisotropic():
    arr = _rng(10).random((12, 16, 20)).astype(np.float32)  # size (x=20, y=16, z=12)
    rot = _rotation_3d([1.0, 2.0, 0.5], 37.0)
    img = _image(arr, (0.8, 1.1, 2.5), (10.0, -20.0, 5.0), rot)
    spacing, size = [1.5, 1.5, 1.5], [12, 12, 20]
    out = resample(img, spacing, size, orientation="image")

    assert out.GetSize() == tuple(size)
    np.testing.assert_allclose(out.GetSpacing(), spacing)
    np.testing.assert_allclose(out.GetDirection(), rot.ravel(), atol=1e-12)
    np.testing.assert_allclose(_centre(out), _centre(img), atol=1e-9)

    half_in = (np.array([20, 16, 12]) - 1) / 2 * np.array([0.8, 1.1, 2.5])
    half_out = (np.array(size) - 1) / 2 * np.array(spacing)
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetOrigin(tuple(np.array([10.0, -20.0, 5.0]) + rot @ (half_in - half_out)))
    ref.SetDirection(rot.ravel().tolist())
    expected = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    got = sitk.GetArrayFromImage(out)
    np.testing.assert_allclose(got, sitk.GetArrayFromImage(expected), atol=1e-5)
    assert np.count_nonzero(got) > 0.5 * got.size  # mostly inside the input, not all padding


def test_resample_3d_block_mean():
    arr = _rng(11).random((8, 10, 12)).astype(np.float32)
    img = _image(arr, (1.0, 1.0, 1.0), (1.0, 2.0, 3.0))
    out = resample(img, [2, 2, 2], [6, 5, 4])
    blocks = arr.astype(np.float64).reshape(4, 2, 5, 2, 6, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), blocks, atol=1e-5)

"""Tests for istn.metrics against independent references (SimpleITK, set arithmetic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from istn.metrics import (
    landmark_centroids,
    landmark_error,
    match_points,
    mean_metrics,
    overlap_metrics,
)

# ---------------------------------------------------------------------------------------------
# helpers


def _sitk_image(mask: np.ndarray, spacing: tuple[float, ...]) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing))
    return img


def _sitk_reference(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> dict:
    p = _sitk_image(pred, spacing)
    r = _sitk_image(ref, spacing)
    lo = sitk.LabelOverlapMeasuresImageFilter()
    lo.Execute(p, r)
    # ITK: FalseNegativeError = |T \ S| / |T| with S the first (source) and T the second
    # (target) image, so recall = 1 - FNE(pred, ref) and precision = 1 - FNE(ref, pred).
    # (FalsePositiveError is |S \ T| / |background of T|, not usable for precision.)
    lo_swapped = sitk.LabelOverlapMeasuresImageFilter()
    lo_swapped.Execute(r, p)
    hd = sitk.HausdorffDistanceImageFilter()
    hd.Execute(p, r)
    return {
        "dice": lo.GetDiceCoefficient(),
        "precision": 1.0 - lo_swapped.GetFalseNegativeError(),
        "recall": 1.0 - lo.GetFalseNegativeError(),
        "hd": hd.GetHausdorffDistance(),
        "asd": hd.GetAverageHausdorffDistance(),
    }


def _set_reference(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Precision and recall from Python sets of voxel index tuples."""
    ps = set(map(tuple, np.argwhere(pred)))
    rs = set(map(tuple, np.argwhere(ref)))
    inter = len(ps & rs)
    return inter / len(ps), inter / len(rs)


def _brute_force_hd_asd(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]
) -> tuple[float, float]:
    """HD and average HD by explicit pairwise distances (array order -> reverse spacing)."""
    sp = np.asarray(spacing[::-1], dtype=float)
    a = np.argwhere(pred) * sp
    b = np.argwhere(ref) * sp
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    d_ab = d.min(axis=1)
    d_ba = d.min(axis=0)
    return max(d_ab.max(), d_ba.max()), (d_ab.mean() + d_ba.mean()) / 2


def _disc(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    """Ball in array order (centre given in array order)."""
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
    return d2 <= radius**2


def _gaussian(shape: tuple[int, ...], centre_xyz: tuple[float, ...], sigma: float) -> np.ndarray:
    """Gaussian blob; ``centre_xyz`` in (x, y[, z]) order, output in array order."""
    centre = centre_xyz[::-1]
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    d2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
    return np.exp(-d2 / (2 * sigma**2))


def _check_against_sitk(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> None:
    got = overlap_metrics(pred.astype(np.float32), ref.astype(np.float32), spacing)
    want = _sitk_reference(pred, ref, spacing)
    assert set(got) == {"dice", "hd", "hd95", "asd", "precision", "recall"}
    assert got["dice"] == pytest.approx(want["dice"], rel=1e-6)
    assert got["precision"] == pytest.approx(want["precision"], rel=1e-6)
    assert got["recall"] == pytest.approx(want["recall"], rel=1e-6)
    assert got["hd"] == pytest.approx(want["hd"], rel=1e-9, abs=1e-9)
    assert got["asd"] == pytest.approx(want["asd"], rel=1e-6)
    prec, rec = _set_reference(pred, ref)
    assert got["precision"] == pytest.approx(prec, rel=1e-12)
    assert got["recall"] == pytest.approx(rec, rel=1e-12)
    for v in got.values():
        assert isinstance(v, float)


# ---------------------------------------------------------------------------------------------
# overlap_metrics


def test_overlap_2d_discs_anisotropic_vs_sitk() -> None:
    shape = (40, 50)  # [y, x]
    pred = _disc(shape, (18.0, 20.0), 9.0)
    ref = _disc(shape, (22.0, 27.0), 7.5)
    _check_against_sitk(pred, ref, (0.7, 1.3))


def test_overlap_2d_boxes_vs_sitk_and_brute_force() -> None:
    pred = np.zeros((20, 30), dtype=bool)
    ref = np.zeros((20, 30), dtype=bool)
    pred[3:12, 4:20] = True
    ref[6:17, 10:27] = True
    spacing = (0.7, 1.3)
    _check_against_sitk(pred, ref, spacing)
    hd, asd = _brute_force_hd_asd(pred, ref, spacing)
    got = overlap_metrics(pred, ref, spacing)
    assert got["hd"] == pytest.approx(hd, rel=1e-12)
    assert got["asd"] == pytest.approx(asd, rel=1e-12)


def test_overlap_3d_balls_anisotropic_vs_sitk() -> None:
    shape = (16, 24, 28)  # [z, y, x]
    pred = _disc(shape, (7.0, 11.0, 12.0), 5.5)
    ref = _disc(shape, (8.5, 13.0, 16.0), 6.0)
    # a distant stray voxel in pred makes the Hausdorff distance non-trivial
    pred[1, 2, 25] = True
    _check_against_sitk(pred, ref, (0.7, 1.3, 2.0))


def test_overlap_3d_brute_force_small() -> None:
    rng = np.random.default_rng(0)
    pred = rng.random((6, 7, 8)) > 0.7
    ref = rng.random((6, 7, 8)) > 0.6
    spacing = (0.7, 1.3, 2.0)
    _check_against_sitk(pred, ref, spacing)
    hd, asd = _brute_force_hd_asd(pred, ref, spacing)
    got = overlap_metrics(pred, ref, spacing)
    assert got["hd"] == pytest.approx(hd, rel=1e-12)
    assert got["asd"] == pytest.approx(asd, rel=1e-12)


def test_spacing_order_is_xyz() -> None:
    # two single voxels 3 apart along x (last array axis) and 0 along y
    pred = np.zeros((5, 10))
    ref = np.zeros((5, 10))
    pred[2, 2] = 1
    ref[2, 5] = 1
    got = overlap_metrics(pred, ref, (2.0, 7.0))
    assert got["hd"] == pytest.approx(6.0)
    assert got["hd95"] == pytest.approx(6.0)
    assert got["asd"] == pytest.approx(6.0)
    assert got["dice"] == 0.0


def test_identical_masks() -> None:
    m = _disc((20, 20), (10, 9), 5)
    got = overlap_metrics(m, m, (1.0, 1.0))
    assert got == {"dice": 1.0, "hd": 0.0, "hd95": 0.0, "asd": 0.0, "precision": 1.0,
                   "recall": 1.0}


def test_threshold_of_float_maps() -> None:
    # a blurred map: values exactly at the threshold are background (strict ">")
    pred = np.array([[0.0, 0.2, 0.5, 0.51, 0.9, 1.0]])
    ref = np.array([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    got = overlap_metrics(pred, ref, (1.0, 1.0))
    # P = {3, 4, 5}, R = {2, 3, 4}
    assert got["dice"] == pytest.approx(2 * 2 / 6)
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx(2 / 3)
    assert got["hd"] == pytest.approx(1.0)
    assert got["asd"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    # a different threshold changes the sets
    got2 = overlap_metrics(pred, ref, (1.0, 1.0), threshold=0.1)
    # P = {1, ..., 5}, R = {2, 3, 4}
    assert got2["precision"] == pytest.approx(3 / 5)
    assert got2["recall"] == pytest.approx(1.0)


def test_blurred_map_equals_binarised() -> None:
    rng = np.random.default_rng(1)
    soft = rng.random((12, 14))
    ref = _disc((12, 14), (6, 7), 4)
    a = overlap_metrics(soft, ref, (0.7, 1.3))
    b = overlap_metrics((soft > 0.5).astype(np.uint8), ref, (0.7, 1.3))
    assert a == pytest.approx(b)


def test_empty_prediction() -> None:
    ref = _disc((10, 10), (5, 5), 3)
    got = overlap_metrics(np.zeros((10, 10)), ref, (1.0, 1.0))
    assert got["dice"] == 0.0
    assert math.isnan(got["precision"])
    assert got["recall"] == 0.0
    assert math.isnan(got["hd"]) and math.isnan(got["hd95"]) and math.isnan(got["asd"])


def test_empty_reference() -> None:
    pred = _disc((10, 10), (5, 5), 3)
    got = overlap_metrics(pred, np.zeros((10, 10)), (1.0, 1.0))
    assert got["dice"] == 0.0
    assert got["precision"] == 0.0
    assert math.isnan(got["recall"])
    assert math.isnan(got["hd"]) and math.isnan(got["hd95"]) and math.isnan(got["asd"])


def test_both_empty() -> None:
    got = overlap_metrics(np.zeros((4, 5, 6)), np.zeros((4, 5, 6)), (1.0, 1.0, 1.0))
    assert all(math.isnan(v) for v in got.values())


def test_overlap_shape_and_spacing_errors() -> None:
    with pytest.raises(ValueError):
        overlap_metrics(np.zeros((4, 5)), np.zeros((5, 4)), (1.0, 1.0))
    with pytest.raises(ValueError):
        overlap_metrics(np.zeros((4, 5)), np.zeros((4, 5)), (1.0, 1.0, 1.0))


def test_overlap_accepts_torch() -> None:
    torch = pytest.importorskip("torch")
    pred = _disc((12, 12), (5, 6), 3)
    ref = _disc((12, 12), (6, 6), 3)
    a = overlap_metrics(torch.from_numpy(pred.astype(np.float32)), torch.from_numpy(ref), (1, 1))
    b = overlap_metrics(pred, ref, (1, 1))
    assert a == pytest.approx(b)


def _brute_force_hd95(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> float:
    """HD95 with surfaces found by comparing each voxel with its face neighbours explicitly
    (zero padding outside the array) and pairwise physical distances: no distance transform."""

    def surf(m: np.ndarray) -> np.ndarray:
        pad = np.pad(m, 1)
        inner = tuple(slice(1, -1) for _ in m.shape)
        out = np.zeros_like(m)
        for ax in range(m.ndim):
            for step in (-1, 1):
                out |= m & ~np.roll(pad, step, axis=ax)[inner]
        return out

    sp = np.asarray(spacing[::-1], dtype=float)
    a = np.argwhere(surf(pred)) * sp
    b = np.argwhere(surf(ref)) * sp
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


@pytest.mark.parametrize("dim", [2, 3])
def test_hd95_vs_brute_force(dim: int) -> None:
    shape = (30, 40) if dim == 2 else (14, 18, 20)
    spacing = (0.7, 1.3) if dim == 2 else (0.7, 1.3, 2.0)
    centre_p = (14.0, 18.0) if dim == 2 else (6.0, 8.0, 9.0)
    centre_r = (16.0, 23.0) if dim == 2 else (7.5, 9.0, 12.0)
    pred = _disc(shape, centre_p, 8.0 if dim == 2 else 4.5)
    ref = _disc(shape, centre_r, 6.5 if dim == 2 else 5.0)
    pred[(0,) * dim] = True  # a stray voxel on the array border: a surface voxel too
    got = overlap_metrics(pred, ref, spacing)
    assert got["hd95"] == pytest.approx(_brute_force_hd95(pred, ref, spacing), rel=1e-12)
    assert 0 < got["hd95"] < got["hd"]  # the stray voxel sets hd, not the 95th percentile


# ---------------------------------------------------------------------------------------------
# landmark_centroids


def test_centroids_2d_xy_order() -> None:
    shape = (40, 60)  # [y, x]
    positions = [(12.3, 7.6), (45.8, 30.2), (30.0, 20.5)]  # (x, y), asymmetric
    img = sum(_gaussian(shape, p, 2.0) for p in positions)
    c = landmark_centroids(img)
    assert c.shape == (3, 2)
    ia, ib = match_points(c, np.array(positions), (1.0, 1.0))
    assert len(ia) == 3
    np.testing.assert_allclose(c[ia], np.array(positions)[ib], atol=0.1)
    # a single blob: explicit check of (x, y) rather than (row, col)
    one = landmark_centroids(_gaussian(shape, (45.8, 7.6), 2.0))
    np.testing.assert_allclose(one, [[45.8, 7.6]], atol=0.1)


def test_centroids_3d_xyz_order() -> None:
    shape = (20, 30, 40)  # [z, y, x]
    pos = (31.4, 9.7, 5.2)  # (x, y, z)
    c = landmark_centroids(_gaussian(shape, pos, 1.8))
    assert c.shape == (1, 3)
    np.testing.assert_allclose(c[0], pos, atol=0.1)


def test_centroids_empty_and_threshold() -> None:
    assert landmark_centroids(np.zeros((8, 9))).shape == (0, 2)
    assert landmark_centroids(np.zeros((4, 8, 9))).shape == (0, 3)
    img = _gaussian((30, 30), (10.0, 10.0), 2.0) + 0.3 * _gaussian((30, 30), (22.0, 20.0), 2.0)
    # default threshold 0.5 * max drops the weak blob; a lower threshold keeps both
    assert landmark_centroids(img).shape == (1, 2)
    assert landmark_centroids(img, threshold=0.1).shape == (2, 2)
    assert landmark_centroids(img, threshold=2.0).shape == (0, 2)


def test_centroids_full_connectivity() -> None:
    img = np.zeros((5, 5))
    img[1, 1] = 1.0
    img[2, 2] = 1.0  # diagonal neighbour: one component under full connectivity
    c = landmark_centroids(img, threshold=0.5)
    assert c.shape == (1, 2)


# ---------------------------------------------------------------------------------------------
# match_points / landmark_error


def test_landmark_error_known_shift() -> None:
    pts = np.array([[10.0, 12.0], [30.0, 5.0], [22.0, 40.0], [3.0, 33.0]])
    moved = pts + np.array([3.0, 4.0])
    assert landmark_error(moved, pts, (1.0, 1.0), match=False) == pytest.approx(5.0)
    assert landmark_error(moved, pts, (1.0, 1.0)) == pytest.approx(5.0)
    assert landmark_error(moved, pts, (2.0, 1.0), match=False) == pytest.approx(math.sqrt(52))
    perm = np.array([2, 0, 3, 1])
    assert landmark_error(moved[perm], pts, (2.0, 1.0), match=True) == pytest.approx(math.sqrt(52))
    assert landmark_error(moved[perm], pts, (1.0, 1.0), match=True) == pytest.approx(5.0)


def test_landmark_error_3d() -> None:
    pts = np.array([[1.0, 2.0, 3.0], [20.0, 10.0, 5.0]])
    moved = pts + np.array([1.0, 2.0, 2.0])
    assert landmark_error(moved, pts, (1.0, 1.0, 1.0), match=False) == pytest.approx(3.0)
    assert landmark_error(moved, pts, (1.0, 1.0, 2.0)) == pytest.approx(math.sqrt(1 + 4 + 16))


def test_landmark_error_mismatch_and_empty() -> None:
    a = np.zeros((3, 2))
    b = np.zeros((2, 2))
    with pytest.raises(ValueError):
        landmark_error(a, b, (1.0, 1.0), match=False)
    # matching uses min(N, M) pairs
    assert landmark_error(a, b, (1.0, 1.0)) == 0.0
    assert math.isnan(landmark_error(np.zeros((0, 2)), np.zeros((0, 2)), (1, 1), match=False))
    assert math.isnan(landmark_error(np.zeros((0, 2)), b, (1.0, 1.0)))


def test_match_points_recovers_permutation() -> None:
    rng = np.random.default_rng(3)
    a = rng.random((6, 2)) * 50
    perm = rng.permutation(6)
    b = a[perm] + 0.1
    ia, ib = match_points(a, b, (1.0, 1.0))
    assert len(ia) == len(ib) == 6
    np.testing.assert_array_equal(perm[ib], ia)
    ia, ib = match_points(a[:4], b, (0.5, 2.0))
    assert len(ia) == 4
    ia, ib = match_points(np.zeros((0, 2)), b, (1.0, 1.0))
    assert ia.shape == ib.shape == (0,)


def test_match_points_uses_spacing() -> None:
    # the optimal assignment flips when the anisotropic spacing is taken into account
    a = np.array([[0.0, 0.0], [10.0, 0.0]])
    b = np.array([[0.0, 3.0], [4.0, 0.0]])
    # spacing (1, 1): cost a0-b0=3, a0-b1=4, a1-b0=~10.4, a1-b1=6 -> (0,0),(1,1): 9
    ia, ib = match_points(a, b, (1.0, 1.0))
    assert list(ib[np.argsort(ia)]) == [0, 1]
    # spacing (0.1, 10): y distances dominate -> a0-b1=0.4, a1-b0=~30, a0-b0=30, a1-b1=0.6
    # options: (a0-b0, a1-b1)=30.6 vs (a0-b1, a1-b0)=0.4+30.0017 -> second is cheaper
    ia, ib = match_points(a, b, (0.1, 10.0))
    assert list(ib[np.argsort(ia)]) == [1, 0]


# ---------------------------------------------------------------------------------------------
# mean_metrics


def test_mean_metrics_ignores_nan_and_none() -> None:
    rows = [
        {"dice": 0.5, "hd": float("nan"), "tre": None},
        {"dice": 0.7, "hd": 2.0, "tre": None},
        {"dice": float("nan"), "hd": 4.0, "tre": float("nan")},
    ]
    out = mean_metrics(rows)
    assert list(out) == ["dice", "hd", "tre"]
    assert out["dice"] == pytest.approx(0.6)
    assert out["hd"] == pytest.approx(3.0)
    assert out["tre"] is None
    assert mean_metrics([]) == {}


def test_mean_metrics_missing_keys() -> None:
    out = mean_metrics([{"a": 1.0}, {"a": 3.0, "b": 2.0}])
    assert out == {"a": 2.0, "b": 2.0}

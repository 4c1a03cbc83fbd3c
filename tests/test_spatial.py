"""Spatial transformations against independent references (SimpleITK, scipy)."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.interpolate import BSpline
from scipy.spatial.transform import Rotation

from istn.nets import STN
from istn.spatial import (
    AffineModel,
    BSplineModel,
    affine_matrix,
    identity_grid,
    index_to_normalised,
    normalised_to_index,
    warp,
)
from istn.spatial.bspline import control_point_origin


def blobs(shape, seed=0):
    """A smooth test image that is zero near its borders (so padding conventions don't matter)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    img = np.zeros(shape)
    for _ in range(6):
        c = [rng.uniform(0.35 * n, 0.65 * n) for n in shape]
        s = rng.uniform(2.0, 4.0)
        img += np.exp(-sum((g - ci) ** 2 for g, ci in zip(grids, c, strict=True)) / (2 * s * s))
    return img.astype(np.float32)


def theta_to_sitk(theta: np.ndarray, shape) -> sitk.AffineTransform:
    """Normalised sampling matrix -> SimpleITK transform in voxel indices (spacing 1, origin 0).

    Normalised u = a * i - 1 with a = 2 / (n - 1) per axis (x, y, z order).
    """
    dim = len(shape)
    a = np.array([2.0 / (n - 1) for n in shape[::-1]])
    mat, t = theta[:, :dim], theta[:, dim]
    m = (mat * a[None, :]) / a[:, None]
    trans = (mat @ -np.ones(dim) + t + 1.0) / a
    tx = sitk.AffineTransform(dim)
    tx.SetMatrix(m.ravel().tolist())
    tx.SetTranslation(trans.tolist())
    return tx


@pytest.mark.parametrize("shape", [(40, 52), (36, 40, 44)])
def test_affine_warp_matches_simpleitk(shape):
    dim = len(shape)
    na = 1 if dim == 2 else 3
    torch.manual_seed(1)
    a = affine_matrix(torch.tensor([[0.05, -0.08, 0.03][:dim]]), torch.rand(1, na) * 0.4 - 0.2,
                      torch.tensor([[1.1, 0.93, 1.05][:dim]]), torch.rand(1, na) * 0.3)
    theta = a[:, :dim].double()
    img = blobs(shape)
    ours = warp(torch.from_numpy(img)[None, None].double(), AffineModel(shape).grid(theta))
    ref = sitk.Resample(sitk.GetImageFromArray(img.astype(np.float64)),
                        theta_to_sitk(theta[0].numpy(), shape), sitk.sitkLinear, 0.0)
    diff = np.abs(ours[0, 0].numpy() - sitk.GetArrayFromImage(ref))
    # Outside the source, ITK returns the default value while grid_sample blends with its
    # zero padding; compare away from the output border (a convention error gives ~1e-1).
    inner = tuple(slice(2, -2) for _ in shape)
    assert diff[inner].max() < 1e-6 * img.max()
    assert diff.max() < 1e-3 * img.max()


def test_affine_matrix_composition_matches_numpy_and_scipy():
    t, r, s, sh = [0.1, -0.2, 0.05], [0.3, 0.1, -0.2], [1.1, 0.9, 1.05], [0.1, 0.2, 0.3]
    ours = affine_matrix(*(torch.tensor([v], dtype=torch.float64) for v in (t, r, s, sh)))[0]
    rot = Rotation.from_euler("ZXZ", r).as_matrix()  # intrinsic: Rz(a1) Rx(a2) Rz(a3)
    shr = Rotation.from_euler("XYZ", sh).as_matrix()
    hom = lambda m: np.block([[m, np.zeros((3, 1))], [np.zeros((1, 3)), np.ones((1, 1))]])  # noqa
    trans = np.eye(4)
    trans[:3, 3] = t
    ref = hom(shr) @ hom(np.diag(s)) @ hom(shr.T) @ hom(rot) @ trans
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)
    # 2D: rotation by a, shear rotation by b.
    a, b = 0.3, -0.2
    ours2 = affine_matrix(torch.tensor([[0.1, -0.1]], dtype=torch.float64),
                          torch.tensor([[a]], dtype=torch.float64),
                          torch.tensor([[1.2, 0.8]], dtype=torch.float64),
                          torch.tensor([[b]], dtype=torch.float64))[0].numpy()
    rot2 = lambda x: np.array([[math.cos(x), -math.sin(x)], [math.sin(x), math.cos(x)]])  # noqa
    lin = rot2(b) @ np.diag([1.2, 0.8]) @ rot2(b).T @ rot2(a)
    np.testing.assert_allclose(ours2[:2, :2], lin, atol=1e-12)
    np.testing.assert_allclose(ours2[:2, 2], lin @ [0.1, -0.1], atol=1e-12)


@pytest.mark.parametrize("shape", [(48, 40), (40, 40, 44)])
def test_zero_initialised_affine_stn_is_identity(shape):
    stn = STN("affine", shape)
    x = torch.rand(2, 2, *shape)
    theta = stn(x)
    np.testing.assert_allclose(theta.detach().numpy(),
                               np.tile(np.eye(len(shape), len(shape) + 1), (2, 1, 1)), atol=1e-7)
    img = torch.rand(2, 1, *shape)
    assert torch.allclose(warp(img, stn.grid(theta)), img, atol=1e-5)


def scipy_bspline_displacement(cp: np.ndarray, shape, spacing: float) -> np.ndarray:
    """Direct sum over control points with scipy's cubic B-spline basis element."""
    beta = BSpline.basis_element([-2, -1, 0, 1, 2], extrapolate=False)
    dim = len(shape)
    out = np.zeros((cp.shape[0], *shape))
    axes_w = []
    for a, n in enumerate(shape):
        ncp = cp.shape[1 + a]
        x0 = (n - 1) / 2 - (ncp - 1) * spacing / 2
        t = (np.arange(n)[:, None] - (x0 + spacing * np.arange(ncp))[None, :]) / spacing
        axes_w.append(np.nan_to_num(beta(t)))
    for k in np.ndindex(*cp.shape[1:]):
        w = axes_w[0][:, k[0]]
        for a in range(1, dim):
            w = np.multiply.outer(w, axes_w[a][:, k[a]])
        out += cp[(slice(None), *k)][(...,) + (None,) * dim] * w
    return out


@pytest.mark.parametrize("shape", [(40, 52), (36, 40, 44)])
def test_bspline_displacement_matches_scipy(shape):
    model = BSplineModel(shape, spacing=10)
    assert model.control_shape == tuple(math.ceil(n / 10) + 2 for n in shape)
    rng = np.random.default_rng(0)
    cp = rng.normal(0, 0.05, (len(shape), *model.control_shape))
    ours = model.displacement(torch.from_numpy(cp)[None].double())[0].numpy()
    ref = scipy_bspline_displacement(cp, shape, 10.0)
    np.testing.assert_allclose(ours, ref, atol=1e-7)  # bases are stored in float32


def test_bspline_grid_points_and_inverse():
    shape = (36, 40, 44)
    model = BSplineModel(shape, spacing=8)
    cp = torch.randn(1, 3, *model.control_shape, dtype=torch.float64) * 0.02
    grid = model.grid(cp)
    idx = torch.tensor([[[5.0, 7.0, 9.0], [20.0, 30.0, 11.0]]], dtype=torch.float64)
    mapped = model.map_points(cp, index_to_normalised(idx, shape))
    for j, (x, y, z) in enumerate(idx[0].long().tolist()):
        assert torch.allclose(mapped[0, j], grid[0, z, y, x], atol=1e-12)
    back = model.inverse_map_points(cp, mapped)
    assert torch.allclose(normalised_to_index(back, shape), idx, atol=1e-6)


def test_bspline_image_centred_in_control_grid():
    for n, s in [(128, 10), (64, 10), (37, 5)]:
        ncp = math.ceil(n / s) + 2
        x0 = control_point_origin(n, ncp, s)
        assert x0 < 0 and x0 + (ncp - 1) * s > n - 1
        assert math.isclose(x0 + (ncp - 1) * s - (n - 1), -x0)


def test_bspline_stn_published_init_is_random_and_zero_init_is_identity():
    shape = (48, 48)
    x = torch.rand(1, 2, *shape)
    torch.manual_seed(0)
    published = STN("bspline", shape)
    assert published(x).abs().max() > 1e-3
    zero = STN("bspline", shape, zero_init=True)
    p = zero(x)
    assert p.abs().max() == 0
    assert torch.allclose(zero.grid(p), identity_grid(shape))
    assert published(x).abs().max() <= 0.2


def test_affine_inverse_map_points_roundtrip():
    shape = (40, 48)
    theta = torch.tensor([[[1.05, 0.1, 0.02], [-0.08, 0.97, -0.05]]], dtype=torch.float64)
    model = AffineModel(shape)
    pts = torch.rand(1, 5, 2, dtype=torch.float64) * 2 - 1
    assert torch.allclose(model.inverse_map_points(theta, model.map_points(theta, pts)), pts)
    # the sampling map agrees with the dense grid at a voxel centre
    idx = torch.tensor([[[3.0, 17.0]]], dtype=torch.float64)
    m = model.map_points(theta, index_to_normalised(idx, shape))
    assert torch.allclose(m[0, 0], model.grid(theta)[0, 17, 3])


@pytest.mark.parametrize("shape", [(40, 52), (36, 44, 40)])
def test_physical_translation_bound_is_the_same_number_of_mm_on_every_axis(shape):
    """``max_translation_mm``: a saturated head translates by exactly that many mm per axis."""
    from istn.config import load_config
    from istn.engine.model import Model

    size = list(shape[::-1])  # x, y[, z]
    spacing = [1.5, 2.0, 3.0][: len(shape)]
    cfg = load_config(None, {"size": size, "spacing": spacing, "max_translation_mm": 12.0})
    model = Model.build(cfg, "u", "affine")
    head = model.stn.head
    with torch.no_grad():
        head.translation.bias.fill_(50.0)  # tanh -> 1: the bound itself
    theta = model.params(torch.zeros(1, 1, *shape), torch.zeros(1, 1, *shape)).detach()
    half = (torch.tensor(size, dtype=torch.float32) - 1) / 2 * torch.tensor(spacing)
    np.testing.assert_allclose((theta[0, :, -1] * half).numpy(), 12.0, rtol=1e-5)
    # unset: the published normalised bound, the same number on every axis
    plain = Model.build(load_config(None, {"size": size, "spacing": spacing}), "u", "affine")
    with torch.no_grad():
        plain.stn.head.translation.bias.fill_(50.0)
    theta = plain.params(torch.zeros(1, 1, *shape), torch.zeros(1, 1, *shape)).detach()
    np.testing.assert_allclose(theta[0, :, -1].numpy(), cfg.max_translation, rtol=1e-5)

"""The stationary velocity field model: scaling and squaring against an ODE integration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.interpolate import RegularGridInterpolator

from istn.spatial import identity_grid, new_transformation
from istn.spatial.grid import index_to_normalised, normalised_to_index


def smooth_params(model, scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, model.dim, *model.control_shape, generator=g,
                       dtype=torch.float64) * scale


def test_zero_velocity_is_the_identity():
    m = new_transformation("svf", (36, 40))
    p = torch.zeros(2, 2, *m.control_shape)
    assert torch.allclose(m.grid(p), identity_grid((36, 40)).expand(2, -1, -1, -1))


def test_constant_velocity_is_a_translation():
    m = new_transformation("svf", (40, 40))
    p = torch.zeros(1, 2, *m.control_shape, dtype=torch.float64)
    p[:, 0] = 0.05  # x velocity everywhere: exp(v) translates by 0.05
    pts = torch.tensor([[[0.1, -0.2], [-0.3, 0.4]]], dtype=torch.float64)
    assert torch.allclose(m.map_points(p, pts), pts + torch.tensor([0.05, 0.0]), atol=1e-6)


def test_scaling_and_squaring_matches_the_flow_of_the_velocity():
    """Points moved by exp(v) against an RK45 integration of dx/dt = v(x) for t in [0, 1]."""
    shape = (48, 44)
    m = new_transformation("svf", shape, steps=8)
    p = smooth_params(m, 0.03)
    v = m.velocity.displacement(p)[0].numpy()  # [2 (x, y), H, W], normalised units
    axes = [np.linspace(-1, 1, n) for n in shape]  # array order (y, x)
    interp = [RegularGridInterpolator(axes, v[c]) for c in range(2)]

    def rhs(_, xy):
        q = np.array([[xy[1], xy[0]]])  # (y, x) for the interpolator
        return [interp[0](q)[0], interp[1](q)[0]]

    starts = np.array([[0.1, 0.2], [-0.4, 0.3], [0.5, -0.5], [0.0, 0.0]])
    want = np.array([solve_ivp(rhs, (0, 1), s, rtol=1e-9, atol=1e-11).y[:, -1]
                     for s in starts])
    got = m.map_points(p, torch.from_numpy(starts)[None])[0].numpy()
    # normalised units: 2 / (n - 1) per voxel, so 1e-3 is about 1/40 voxel
    np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("shape", [(40, 44), (36, 36, 40)])
def test_inverse_is_the_negated_velocity_and_round_trips(shape):
    m = new_transformation("svf", shape)
    p = smooth_params(m, 0.05)
    pts = torch.rand(1, 20, len(shape), dtype=torch.float64) * 1.4 - 0.7
    back = m.inverse_map_points(p, m.map_points(p, pts))
    voxels = (normalised_to_index(back, shape) - normalised_to_index(pts, shape)).abs().max()
    assert voxels < 0.05


def test_large_smooth_velocities_do_not_fold_where_a_bspline_of_that_size_does():
    shape = (48, 48)
    svf, bsp = new_transformation("svf", shape), new_transformation("bspline", shape)
    p = smooth_params(svf, 0.25, seed=3)

    def min_jacobian(grid: torch.Tensor) -> float:
        idx = normalised_to_index(grid[0], shape)  # voxel positions (x, y)
        dx = idx[:, 1:, :] - idx[:, :-1, :]
        dy = idx[1:, :, :] - idx[:-1, :, :]
        det = dx[:-1, :, 0] * dy[:, :-1, 1] - dx[:-1, :, 1] * dy[:, :-1, 0]
        return float(det.min())

    assert min_jacobian(bsp.grid(p)) < 0  # this velocity as a displacement folds
    assert min_jacobian(svf.grid(p)) > 0  # its exponential does not


def test_points_map_like_the_dense_grid_at_voxel_centres():
    shape = (40, 48)
    m = new_transformation("svf", shape)
    p = smooth_params(m, 0.05)
    idx = torch.tensor([[[3.0, 17.0], [20.0, 5.0]]], dtype=torch.float64)
    mapped = m.map_points(p, index_to_normalised(idx, shape))
    grid = m.grid(p)
    assert torch.allclose(mapped[0, 0], grid[0, 17, 3], atol=1e-6)
    assert torch.allclose(mapped[0, 1], grid[0, 5, 20], atol=1e-6)


@pytest.mark.parametrize("shape,stride,bound", [((41, 45), 2, 0.05), ((40, 44), 4, 0.2),
                                                ((33, 36, 29), 4, 0.2)])
def test_a_coarser_integration_grid_matches_the_full_one(shape, stride, bound):
    """``svf_stride``: integrated every ``stride`` voxels, then interpolated; the velocity
    is smooth at the control spacing (10 voxels), so points move as with the full grid
    (to a fraction of a voxel, for velocities of about a voxel per control point) and the
    dense grid agrees with the points it maps."""
    full = new_transformation("svf", shape)
    coarse = new_transformation("svf", shape, stride=stride)
    assert coarse.coarse == tuple(-(-(n - 1) // stride) + 1 for n in shape)
    p = smooth_params(full, 0.05)
    gen = torch.Generator().manual_seed(1)
    pts = torch.rand(1, 50, len(shape), dtype=torch.float64, generator=gen) * 1.8 - 0.9
    for a, b in ((full.map_points(p, pts), coarse.map_points(p, pts)),
                 (full.inverse_map_points(p, pts), coarse.inverse_map_points(p, pts))):
        voxels = (normalised_to_index(a, shape) - normalised_to_index(b, shape)).abs().max()
        assert 0 < voxels < bound
    grid = coarse.grid(p.float())
    assert grid.shape == full.grid(p.float()).shape
    # the dense grid at voxel centres equals mapping those voxels' points
    at = identity_grid(shape).reshape(1, -1, len(shape))
    assert torch.allclose(grid.reshape(1, -1, len(shape)),
                          coarse.map_points(p.float(), at), atol=1e-5)


def test_svf_stride_is_a_config_key_passed_to_the_model():
    from istn.config import from_dict, validate
    from istn.errors import IstnError

    cfg = validate(from_dict({"size": [40, 40], "svf_stride": 2}))
    m = new_transformation("affine+svf", (40, 40), stride=cfg.svf_stride)
    assert m.stages[1].coarse == (21, 21)
    with pytest.raises(IstnError, match="svf_stride"):
        validate(from_dict({"size": [40, 40], "svf_stride": 0}))

"""Levenberg–Marquardt refinement (``refine_mode`` 'lm', :mod:`istn.engine.lm`)."""

from __future__ import annotations

import pytest
import torch

from istn.config import load_config
from istn.engine import lm
from istn.engine.model import Model
from istn.engine.refine import RefineSettings, all_voxels, refine, sample_voxels
from istn.errors import IstnError
from istn.spatial import AffineModel, Transformation
from istn.spatial.grid import sample_points


def _affine_map(theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return points @ theta[:, :, :-1].transpose(1, 2) + theta[:, None, :, -1]


def _blobs(shape, n: int = 5, seed: int = 0) -> torch.Tensor:
    """A smooth image [1, 1, *shape]: a sum of wide Gaussian blobs."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, s) for s in shape]
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], -1)
    img = sum(torch.exp(-((pts - (torch.rand(len(shape), generator=g) - 0.5)) ** 2).sum(-1)
                        / 0.15) for _ in range(n))
    return img[None, None]


def _identity(b: int, dim: int) -> torch.Tensor:
    return torch.cat([torch.eye(dim), torch.zeros(dim, 1)], 1).expand(b, -1, -1).clone()


def _case(shape, seed: int = 0, b: int = 1):
    dim = len(shape)
    src = _blobs(shape, seed=seed).expand(b, -1, *[-1] * dim)
    g = torch.Generator().manual_seed(seed + 1)
    truth = _identity(b, dim) + torch.cat([0.05 * torch.randn(b, dim, dim, generator=g),
                                           0.08 * torch.randn(b, dim, 1, generator=g)], 2)
    pts, _ = all_voxels(src)
    trg = sample_points(src, _affine_map(truth, pts)).view_as(src)
    return src, trg, truth


def _minimise(opt, shape, points, src, values, iterations, tolerance):
    aff = AffineModel(shape)
    return opt.minimise(lambda t: aff.map_points(t, points),
                        lambda t: aff.map_points_jacobian(t, points),
                        lambda q: sample_points(src, q) - values, iterations, tolerance)


def test_recovers_a_known_3d_affine():
    shape = (24, 28, 26)
    src, trg, truth = _case(shape)
    points, values = sample_voxels(trg, 3000)
    opt = lm.LevenbergMarquardt(_identity(1, 3))
    taken = _minimise(opt, shape, points, src, values, 60, 0.0)
    assert taken < 60  # stopped on its own (no step lowers the loss any more)
    torch.testing.assert_close(opt.params, truth, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dim", [2, 3])
def test_affine_point_jacobian_matches_forward_mode(dim):
    aff = AffineModel([8] * dim)
    g = torch.Generator().manual_seed(dim)
    theta = _identity(2, dim) + 0.1 * torch.randn(2, dim, dim + 1, generator=g)
    points = torch.rand(2, 50, dim, generator=g) * 2 - 1
    generic = Transformation.map_points_jacobian(aff, theta, points)  # jvp, vmapped
    want = torch.autograd.functional.jacobian(
        lambda t: aff.map_points(t.view_as(theta), points), theta.flatten(1))
    want = torch.stack([want[b, :, :, b] for b in range(2)])  # [B, N, dim, P]
    torch.testing.assert_close(aff.map_points_jacobian(theta, points), want)
    torch.testing.assert_close(generic, want)


def test_jacobian_matches_autograd():
    src, trg, _ = _case((20, 22), b=2)
    points, values = sample_voxels(trg, 200)
    aff = AffineModel((20, 22))
    theta = _identity(2, 2).flatten(1) + 0.01

    def mapped(t):
        return aff.map_points(t.view(2, 2, 3), points)

    def residuals(q):
        return sample_points(src, q) - values

    _, r, jac = lm._terms(mapped(theta), aff.map_points_jacobian(theta.view(2, 2, 3), points),
                          residuals)
    want = torch.autograd.functional.jacobian(lambda t: residuals(mapped(t)).flatten(1), theta)
    # pairs do not interact: pair b's residuals depend on pair b's parameters only
    torch.testing.assert_close(jac, torch.stack([want[b, :, b] for b in range(2)]),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r, residuals(mapped(theta)).flatten(1))


def test_pairs_are_optimised_independently():
    src, trg, _ = _case((24, 20), b=3)
    points, values = sample_voxels(trg, 500)

    def run(rows):
        opt = lm.LevenbergMarquardt(_identity(len(rows), 2))
        _minimise(opt, (24, 20), points[rows], src[rows], values[rows], 15, 1e-4)
        return opt.params

    together = run([0, 1, 2])
    for i in range(3):
        torch.testing.assert_close(run([i]), together[i:i + 1], atol=1e-5, rtol=0)


def _model(kind: str = "affine", size=(36, 40)) -> Model:
    torch.manual_seed(0)
    cfg = load_config(None, {"size": list(size), "spacing": [1.0, 1.0], "bspline_spacing": 8,
                             "refine_inputs": "images"})
    model = Model.build(cfg, "u", kind)
    model.train(False)
    return model


def _sim_loss(src, trg, params, model):
    pts, values = all_voxels(trg)
    warped = sample_points(src, model.stn.transform.map_points(params, pts))
    return ((warped - values) ** 2).mean((1, 2))


def test_lm_refinement_reaches_adam_in_fewer_iterations():
    model = _model()
    cases = [_case((40, 36), seed=s) for s in range(2)]
    src, trg = torch.cat([c[0] for c in cases]), torch.cat([c[1] for c in cases])
    lm_params = refine(model, src, trg, RefineSettings(20, 1e-2, "lm", inputs="images"),
                       progress=False, images=(src, trg))
    adam = refine(model, src, trg, RefineSettings(400, 1e-2, "params", inputs="images"),
                  progress=False, images=(src, trg))
    with torch.no_grad():
        start = _sim_loss(src, trg, model.params(src, trg), model)
    end_lm, end_adam = _sim_loss(src, trg, lm_params, model), _sim_loss(src, trg, adam, model)
    assert (end_lm < 0.1 * start).all()
    assert (end_lm <= end_adam * 1.01).all(), (end_lm, end_adam)


def test_lm_refuses_many_parameters():
    model = _model("bspline")
    x = torch.rand(1, 1, 40, 36)
    with pytest.raises(IstnError, match="refine_mode.*'lm'.*at most"):
        refine(model, x, x, RefineSettings(2, 1e-2, "lm", inputs="images"), progress=False,
               images=(x, x))


def test_lm_then_params_for_a_cascade():
    model = _model("affine+svf")
    x = _blobs((40, 36))
    y = _case((40, 36))[1]
    settings = RefineSettings(5, 1e-2, "lm+params", inputs="images", stages="sequential")
    out = refine(model, x, y, settings, progress=False, images=(x, y))
    assert out.shape == (1, *model.transform.params_shape) and torch.isfinite(out).all()


@pytest.mark.parametrize("overrides,match", [
    ({"refine_mode": "lm", "refine_similarity": "lncc"}, "refine_mode.*mse"),
    ({"refine_mode": "lm", "refine_similarity": "mi"}, "refine_mode.*mse"),
])
def test_lm_config_errors(overrides, match):
    with pytest.raises(IstnError, match=match):
        load_config(None, {"size": [36, 40], "spacing": [1.0, 1.0], **overrides})

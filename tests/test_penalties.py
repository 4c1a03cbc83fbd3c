"""Diffusion and bending energy against fields whose derivatives are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from istn.config import from_dict
from istn.engine.model import Model
from istn.errors import IstnError
from istn.spatial import new_transformation
from istn.spatial.penalties import bending, diffusion


def quadratic_field(shape, a: float, b: float) -> torch.Tensor:
    """x component a x^2 + b x y (voxel steps), y component 0: d2/dx2 = 2a, d2/dxdy = b."""
    y, x = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    field = np.zeros((1, 2, *shape))
    field[0, 0] = a * x ** 2 + b * x * y
    return torch.from_numpy(field)


def test_bending_of_a_quadratic_field():
    f = quadratic_field((12, 15), a=0.3, b=-0.2)
    # mean over the two components: the y component is zero
    want = ((2 * 0.3) ** 2 + 2 * 0.2 ** 2) / 2
    assert bending(f).item() == pytest.approx(want, rel=1e-12)


def test_diffusion_of_a_linear_field_and_zero_for_translations():
    y, x = np.meshgrid(np.arange(10.0), np.arange(9.0), indexing="ij")
    f = torch.from_numpy(np.stack([0.5 * x, -0.25 * y])[None])
    assert diffusion(f).item() == pytest.approx((0.5 ** 2 + 0.25 ** 2) / 2, rel=1e-12)
    assert bending(f).item() == pytest.approx(0.0, abs=1e-20)
    assert diffusion(torch.full((1, 2, 8, 8), 3.0)).item() == 0.0


@pytest.mark.parametrize("name", ["bspline", "svf", "affine+svf"])
def test_models_regularise_their_deformation_and_affine_is_free(name):
    t = new_transformation(name, (40, 44))
    params = torch.randn(2, *t.params_shape) * 0.05
    field = t.deformation(params)
    # float32: the control-point forms sum in another order than the dense differences
    assert torch.allclose(t.regularisation(params), diffusion(field), rtol=1e-4)
    assert torch.allclose(t.bending(params), bending(field), rtol=1e-4)
    a = new_transformation("affine", (40, 44))
    theta = torch.eye(2, 3)[None]
    assert a.regularisation(theta).item() == 0.0 and a.bending(theta).item() == 0.0


def test_bending_weight_enters_the_training_loss():
    torch.manual_seed(0)
    cfg = from_dict({"size": [48, 48], "bending": 10.0})
    model = Model(cfg, "u", "bspline")  # published random head: a non-zero deformation
    b = {"src": torch.rand(2, 1, 48, 48), "trg": torch.rand(2, 1, 48, 48),
         "src_seg": None, "trg_seg": None}
    loss, terms = model(b)
    assert terms["bending"] > 0
    assert loss.item() == pytest.approx((terms["stn_u"] + 10.0 * terms["bending"]).item())
    with pytest.raises(IstnError, match="bending"):
        from_dict({"bending": -1})


def test_per_pair_penalties_are_each_pairs_own():
    t = new_transformation("affine+svf", (40, 44))
    params = torch.randn(3, *t.params_shape) * 0.05
    for fn in (t.regularisation, t.bending):
        each = fn(params, per_pair=True)
        assert each.shape == (3,)
        for i in range(3):
            assert each[i].item() == pytest.approx(fn(params[i:i + 1]).item(), rel=1e-6)
        assert each.mean().item() == pytest.approx(fn(params).item(), rel=1e-6)
    a = new_transformation("affine", (40, 44))
    assert a.regularisation(torch.eye(2, 3).expand(2, 2, 3), per_pair=True).shape == (2,)


@pytest.mark.parametrize("weight", ["smoothness", "bending"])
def test_refinement_minimises_the_regularised_objective(weight):
    from istn.engine.refine import RefineSettings, refine

    torch.manual_seed(0)
    src, trg = torch.rand(2, 1, 40, 40), torch.rand(2, 1, 40, 40)  # noise: nothing to align
    penalties = {}
    for w in (0.0, 1e4):
        cfg = from_dict({"size": [40, 40], weight: w, "bspline_spacing": 8})
        model = Model(cfg, "u", "svf").eval()
        settings = RefineSettings(iterations=40, learning_rate=0.01, mode="params")
        params = refine(model, src, trg, settings, progress=False)
        fn = model.transform.regularisation if weight == "smoothness" else model.transform.bending
        penalties[w] = fn(params).item()
    # unregularised, the velocity fits the noise; weighted, it stays far smoother
    assert penalties[1e4] < 0.2 * penalties[0.0]


@pytest.mark.parametrize("kind", ["bspline", "svf", "affine+bspline", "affine+svf"])
@pytest.mark.parametrize("shape", [(23, 30), (13, 17, 15)])
def test_control_point_penalties_equal_the_dense_field_ones(kind, shape):
    """The B-spline / SVF penalties from control points (quadratic forms) against the
    finite differences of the dense field they define (``penalties`` on ``deformation``)."""
    model = new_transformation(kind, shape, spacing=4)
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(3, *model.params_shape, generator=gen, dtype=torch.float64) * 0.1
    field = model.deformation(params)
    for per_pair in (True, False):
        assert torch.allclose(model.regularisation(params, per_pair),
                              diffusion(field, per_pair), rtol=1e-10)
        assert torch.allclose(model.bending(params, per_pair), bending(field, per_pair),
                              rtol=1e-10)

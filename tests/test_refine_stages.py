"""Sequential refinement of cascades (config ``refine_stages`` 'sequential').

The affine stage is refined first with the deformable stage at the identity, so its
result must equal refining an affine model that holds the cascade's affine-stage STN;
the deformable stage is then refined on the source warped by the refined affine. With
no iterations both phases reduce to the cascade's own prediction.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from istn.config import load_config
from istn.engine.model import Model
from istn.engine.refine import RefineSettings, refine
from istn.errors import IstnError
from istn.spatial import warp

SIZE = [36, 40]


def _model(kind: str, smoothness: float = 0.0) -> Model:
    torch.manual_seed(0)
    cfg = load_config(None, {"size": SIZE, "spacing": [1.0, 1.0], "bspline_spacing": 8,
                             "smoothness": smoothness})
    model = Model.build(cfg, "i", kind)
    with torch.no_grad():  # leave the identity start so that both stages move
        for name, p in model.stn.named_parameters():
            if "encoder" not in name:
                p.add_(0.05 * torch.randn_like(p))
    model.train(False)
    return model


def _primes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blur = torch.nn.AvgPool2d(5, 1, 2)
    return tuple(blur(torch.rand(n, 1, *SIZE[::-1], generator=g)) for _ in range(2))


@pytest.mark.parametrize("mode", ["weights", "params"])
@pytest.mark.parametrize("kind", ["affine+svf", "affine+bspline"])
def test_no_iterations_give_the_cascade_prediction(kind, mode):
    model = _model(kind)
    s_p, t_p = _primes(3, 0)
    settings = RefineSettings(0, 1e-3, mode, stages="sequential")
    with torch.no_grad():
        want = model.params(s_p, t_p)
    torch.testing.assert_close(refine(model, s_p, t_p, settings, progress=False), want,
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["weights", "params"])
def test_affine_stage_is_refined_as_an_affine_model(mode):
    cascade = _model("affine+svf", smoothness=1.0)
    affine = _model("affine")
    affine.stn.load_state_dict(cascade.stn.stages[0].state_dict())
    s_p, t_p = _primes(3, 1)
    settings = RefineSettings(15, 1e-2, mode, stages="sequential")
    out = refine(cascade, s_p, t_p, settings, progress=False)
    theta, velocity = cascade.transform.split(out)
    alone = refine(affine, s_p, t_p, dataclasses.replace(settings, stages="joint"),
                   progress=False)
    torch.testing.assert_close(theta, alone, atol=1e-5, rtol=0)
    # the deformable stage was refined afterwards, unlike in a joint refinement
    assert velocity.abs().sum() > 0
    joint = refine(cascade, s_p, t_p, dataclasses.replace(settings, stages="joint"),
                   progress=False)
    assert not torch.allclose(joint, out)


def test_sequential_refinement_lowers_the_loss():
    model = _model("affine+svf", smoothness=0.1)
    s_p, t_p = _primes(2, 2)

    def loss(params):
        return float(torch.nn.functional.mse_loss(warp(s_p, model.stn.grid(params)), t_p))

    with torch.no_grad():
        before = loss(model.params(s_p, t_p))
    after = loss(refine(model, s_p, t_p, RefineSettings(30, 1e-2, "weights",
                                                        stages="sequential"),
                        progress=False))
    assert after < before


def test_unknown_refine_stages_is_a_config_error():
    with pytest.raises(IstnError, match="refine_stages"):
        load_config(None, {"size": SIZE, "refine_stages": "staged"})


def test_one_mode_per_stage():
    """'weights+params': the affine stage's STN copies, then the deformable parameters."""
    model = _model("affine+svf", smoothness=1.0)
    s_p, t_p = _primes(2, 3)
    settings = RefineSettings(10, 1e-2, "weights+params", stages="sequential")
    theta, velocity = model.transform.split(refine(model, s_p, t_p, settings,
                                                   progress=False))
    all_weights = refine(model, s_p, t_p, dataclasses.replace(settings, mode="weights"),
                         progress=False)
    want_theta, weights_velocity = model.transform.split(all_weights)
    torch.testing.assert_close(theta, want_theta, atol=1e-6, rtol=0)
    assert not torch.allclose(velocity, weights_velocity)
    # the second phase by hand: Adam on the velocity predicted on the refined affine
    x = model.stn_input(s_p, t_p)
    moved = warp(x[:, :1], model.transform.stage_grid([theta]))
    with torch.no_grad():
        v = model.stn.stages[1](torch.cat([moved, x[:, 1:]], 1)).clone()
    v.requires_grad_(True)
    opt = torch.optim.Adam([v], lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        params = model.transform.pack([theta, v])
        per_pair = ((warp(s_p, model.stn.grid(params)) - t_p) ** 2).flatten(1).mean(1)
        per_pair = per_pair + model.transform.regularisation(params, per_pair=True)
        per_pair.sum().backward()
        opt.step()
    torch.testing.assert_close(velocity, v.detach(), atol=1e-5, rtol=0)


def test_per_stage_modes_need_a_sequential_cascade():
    with pytest.raises(IstnError, match="refine_mode"):
        load_config(None, {"size": SIZE, "refine_mode": "weights+params"})
    with pytest.raises(IstnError, match="refine_mode"):
        load_config(None, {"size": SIZE, "refine_mode": "weights+adam",
                           "refine_stages": "sequential"})
    s_p, t_p = _primes(1, 0)
    settings = RefineSettings(1, 1e-2, "weights+params", stages="sequential")
    with pytest.raises(IstnError, match="refine_mode"):
        refine(_model("affine"), s_p, t_p, settings, progress=False)

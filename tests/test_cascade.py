"""Cascades: the affine stage, then the deformable stage in target space (phi = A o (id + u))."""

from __future__ import annotations

import pytest
import torch

from istn.nets import STN
from istn.spatial import identity_grid, new_transformation, warp
from istn.spatial.grid import index_to_normalised

SHAPE = (40, 48)


def random_parts(cascade, seed=0):
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(2, 3, dtype=torch.float64)[None]
    theta = eye + 0.05 * torch.randn(1, 2, 3, generator=g, dtype=torch.float64)
    deform = 0.03 * torch.randn(1, *cascade.stages[1].params_shape, generator=g,
                                dtype=torch.float64)
    return theta, deform


@pytest.mark.parametrize("name", ["affine+svf", "affine+bspline"])
def test_identity_stages_reduce_to_the_other_stage(name):
    c = new_transformation(name, SHAPE)
    theta, deform = random_parts(c)
    eye = torch.eye(2, 3, dtype=torch.float64)[None]
    zero = torch.zeros_like(deform)
    assert torch.allclose(c.grid(c.pack([theta, zero])), c.stages[0].grid(theta), atol=1e-6)
    assert torch.allclose(c.grid(c.pack([eye, deform])), c.stages[1].grid(deform), atol=1e-6)


def test_composition_order_and_points_agree_with_the_grid():
    c = new_transformation("affine+svf", SHAPE)
    theta, deform = random_parts(c, 1)
    params = c.pack([theta, deform])
    grid = c.grid(params)
    # phi(x) = A(x + u(x)): the deformable grid, then the affine map
    inner = c.stages[1].grid(deform).reshape(1, -1, 2)
    want = c.stages[0].map_points(theta, inner).reshape(grid.shape)
    assert torch.allclose(grid, want, atol=1e-12)
    idx = torch.tensor([[[5.0, 7.0], [30.0, 21.0]]], dtype=torch.float64)
    pts = c.map_points(params, index_to_normalised(idx, SHAPE))
    assert torch.allclose(pts[0, 0], grid[0, 7, 5], atol=1e-6)
    assert torch.allclose(pts[0, 1], grid[0, 21, 30], atol=1e-6)
    back = c.inverse_map_points(params, pts)
    assert torch.allclose(back, index_to_normalised(idx, SHAPE), atol=2e-3)


def test_second_stage_sees_the_source_warped_by_the_first():
    torch.manual_seed(0)
    stn = STN("affine+svf", SHAPE)
    with torch.no_grad():
        stn.stages[0].head.translation.bias.fill_(0.5)  # a clear shift in the first stage
    seen = {}

    def keep_input(module, args, out) -> None:
        seen["x"] = args[0]

    stn.stages[1].encoder.register_forward_hook(keep_input)
    x = torch.rand(2, 2, *SHAPE)
    params = stn(x)
    theta = stn.transform.split(params)[0]
    moved = warp(x[:, :1], stn.transform.stages[0].grid(theta))
    assert torch.allclose(seen["x"][:, :1], moved, atol=1e-6)
    assert torch.equal(seen["x"][:, 1:], x[:, 1:])
    assert not torch.allclose(moved, x[:, :1])


def test_cascade_starts_at_the_identity():
    stn = STN("affine+svf", SHAPE)
    grid = stn.grid(stn(torch.rand(1, 2, *SHAPE)))
    assert torch.allclose(grid, identity_grid(SHAPE), atol=1e-6)


@pytest.mark.parametrize("name", ["affine", "bspline", "svf", "affine+bspline", "affine+svf"])
def test_every_model_round_trips_through_a_checkpoint(tmp_path, name):
    from istn.config import from_dict
    from istn.engine.checkpoint import load_model, save_checkpoint
    from istn.engine.model import Model

    torch.manual_seed(0)
    model = Model(from_dict({"size": [48, 48]}), "i", name)
    with torch.no_grad():
        for p in model.stn.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(model, tmp_path / "checkpoint.pt")
    loaded, _ = load_model(tmp_path)
    assert loaded.transformation == name
    for (k, a), (_, b) in zip(model.stn.state_dict().items(), loaded.stn.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), k
    x = torch.rand(1, 1, 48, 48)
    assert torch.equal(model.params(x, x), loaded.params(x, x))


def test_checkpoints_of_istn_0_1_load_with_their_old_weight_names(tmp_path):
    from istn.config import from_dict
    from istn.engine.checkpoint import load_model, save_checkpoint
    from istn.engine.model import Model

    torch.manual_seed(0)
    model = Model(from_dict({"size": [48, 48]}), "s", "affine")
    save_checkpoint(model, tmp_path / "checkpoint.pt")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["stn"] = {k.replace("head.", ""): v for k, v in state["stn"].items()}  # 0.1 names
    assert "fc.0.weight" in state["stn"]
    torch.save(state, tmp_path / "checkpoint.pt")
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded.stn.head.fc[0].weight, model.stn.head.fc[0].weight)


def test_cascade_registered_without_warping_has_the_same_composite():
    """``register(..., warp=False)``: the same composite transforms, no total fields and
    no Jacobian statistics (the metrics of a warped registration)."""
    import numpy as np
    import SimpleITK as sitk

    import istn
    from istn.config import from_dict
    from istn.engine.model import Model

    torch.manual_seed(0)
    model = Model(from_dict({"size": [40, 40], "bspline_spacing": 8}), "u", "affine+svf")
    with torch.no_grad():  # a non-identity deformable stage
        for name, p in model.stn.named_parameters():
            if "stages.1" in name and "head" in name:
                p.add_(0.01 * torch.randn_like(p))
    model.eval()
    gen = np.random.default_rng(0)
    src = sitk.GetImageFromArray(gen.random((40, 40)).astype(np.float32))
    trg = sitk.GetImageFromArray(gen.random((40, 40)).astype(np.float32))
    full = istn.register(model, source=src, target=trg, refine=0)
    bare = istn.register(model, source=src, target=trg, refine=0, warp=False)
    assert full.field is not None and "jacobian_min" in full.metrics
    assert bare.field is None and bare.inverse_field is None
    assert not any(k.startswith("jacobian") for k in bare.metrics)
    for p in ([3.0, 5.0], [20.5, 17.25], [39.0, 0.0]):
        np.testing.assert_allclose(bare.transform.TransformPoint(p),
                                   full.transform.TransformPoint(p), atol=1e-9)
        np.testing.assert_allclose(bare.inverse.TransformPoint(p),
                                   full.inverse.TransformPoint(p), atol=1e-9)
    moved = max(np.linalg.norm(np.subtract(full.transform.TransformPoint(p), p))
                for p in ([3.0, 5.0], [20.5, 17.25]))
    assert moved > 1e-3  # the test registers something

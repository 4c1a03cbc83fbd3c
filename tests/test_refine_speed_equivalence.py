"""Batched test-time refinement of the STN weights equals refining each pair on its own.

``refine(mode='weights')`` runs all pairs of a chunk together (grouped convolutions,
batched products, one fused Adam); the reference here is the plain definition: a deep
copy of the STN per pair, an ordinary ``torch.optim.Adam`` and a Python loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from istn.config import load_config
from istn.engine.model import Model
from istn.engine.per_pair import per_pair_stn
from istn.engine.refine import RefineSettings, refine
from istn.losses import refinement_loss

LR = 1e-3


def _model(kind: str, size: list[int], channels_last: bool = True) -> Model:
    torch.manual_seed(0)
    cfg = load_config(None, {"size": size, "spacing": [1.0] * len(size),
                             "bspline_spacing": 8})
    model = Model.build(cfg, "i", kind)
    with torch.no_grad():  # leave the identity start: every weight then gets a gradient
        for name, p in model.stn.named_parameters():
            if "encoder" not in name:
                p.add_(0.05 * torch.randn_like(p))
    if not channels_last:
        model.stn.to(memory_format=torch.contiguous_format)
    model.train(False)
    return model


def _images(n: int, size: list[int], seed: int) -> torch.Tensor:
    """Smooth blobs at random positions (realistic-ish S', T'), [n, 1, *size]."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in size], indexing="ij")
    out = []
    for _ in range(n):
        c = (torch.rand(len(size), generator=g) - 0.5) * 0.4
        r = 0.3 + 0.2 * torch.rand(1, generator=g)
        d = torch.sqrt(sum((a - ci) ** 2 for a, ci in zip(axes, c, strict=True)))
        out.append(torch.sigmoid((r - d) / 0.05))
    return torch.stack(out)[:, None]


def _reference(model: Model, s_p: torch.Tensor, t_p: torch.Tensor, iterations: int
               ) -> torch.Tensor:
    """Each pair alone: its own copy of the STN, plain Adam, a plain loop."""
    out = []
    for i in range(len(s_p)):
        stn = copy.deepcopy(model.stn)
        opt = torch.optim.Adam(stn.parameters(), lr=LR)
        s, t = s_p[i:i + 1], t_p[i:i + 1]
        x = torch.cat([s, t], dim=1)
        for _ in range(iterations):
            opt.zero_grad()
            refinement_loss(stn.grid(stn(x)), s, t).sum().backward()
            opt.step()
        with torch.no_grad():
            out.append(stn(x))
    return torch.cat(out)


CASES = [
    pytest.param("affine", [48, 48], True, id="2d-affine"),
    pytest.param("affine", [40, 44], False, id="2d-affine-contiguous"),
    pytest.param("bspline", [48, 48], True, id="2d-bspline"),
    pytest.param("svf", [48, 48], True, id="2d-svf"),
    pytest.param("affine+svf", [48, 48], True, id="2d-affine+svf"),
    pytest.param("affine", [40, 40, 40], True, id="3d-affine"),
]


@pytest.mark.parametrize(("kind", "size", "channels_last"), CASES)
def test_batched_weight_refinement_equals_per_pair_reference(kind, size, channels_last):
    model = _model(kind, size, channels_last)
    n, iterations = 3, 12
    shape = list(model.cfg.shape)  # array order
    s_p, t_p = _images(n, shape, 1), _images(n, shape, 2)
    before = {k: v.clone() for k, v in model.stn.state_dict().items()}
    with torch.no_grad():
        start = model.stn(torch.cat([s_p, t_p], dim=1))

    assert per_pair_stn(model.stn, n) is not None  # the batched path, not the fallback
    got = refine(model, s_p, t_p, RefineSettings(iterations, LR, "weights"), progress=False)
    chunked = refine(model, s_p, t_p, RefineSettings(iterations, LR, "weights", chunk=2),
                     progress=False)
    want = _reference(model, s_p, t_p, iterations)

    assert got.shape == want.shape == start.shape
    moved = (want - start).abs().max().item()
    assert moved > 1e-3, moved  # the refinement really changed the parameters
    # Equal up to float32 round-off (different summation orders, fused Adam). Adam's
    # normalised steps can turn round-off in a near-zero gradient into a step of up to
    # the learning rate; 3D grouped and plain conv3d on two threads differ enough for
    # that (1.7e-4 measured on an AMD EPYC), so 3D gets half a learning rate. The
    # float64 test below shows the two computations are the same.
    atol = 0.5 * LR if len(size) == 3 else 2e-5
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    torch.testing.assert_close(chunked, want, rtol=0, atol=atol)
    for k, v in model.stn.state_dict().items():  # the model itself is left untouched
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(("kind", "size", "channels_last", "iterations"), [
    pytest.param("affine", [48, 48], True, 30, id="2d-affine"),
    pytest.param("affine", [40, 44], False, 30, id="2d-affine-contiguous"),
    pytest.param("bspline", [48, 48], True, 30, id="2d-bspline"),
    pytest.param("affine", [36, 36, 36], True, 6, id="3d-affine"),  # float64 conv3d is slow
])
def test_batched_weight_refinement_is_exact_in_float64(kind, size, channels_last, iterations):
    """In float64 round-off vanishes: the two optimisations are the same computation."""
    model = _model(kind, size, channels_last)
    model.stn.double()
    n = 3
    shape = list(model.cfg.shape)
    s_p, t_p = _images(n, shape, 5).double(), _images(n, shape, 6).double()

    got = refine(model, s_p, t_p, RefineSettings(iterations, LR, "weights"), progress=False)
    want = _reference(model, s_p, t_p, iterations)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def test_unsupported_layer_falls_back_to_vmap():
    """A layer with its own weights but no batched form (here PReLU) still refines exactly."""
    model = _model("affine", [40, 40])
    model.stn.encoder.net[1] = nn.PReLU()
    n, iterations = 2, 8
    s_p, t_p = _images(n, [40, 40], 3), _images(n, [40, 40], 4)

    assert per_pair_stn(model.stn, n) is None
    got = refine(model, s_p, t_p, RefineSettings(iterations, LR, "weights"), progress=False)
    torch.testing.assert_close(got, _reference(model, s_p, t_p, iterations), rtol=0, atol=2e-5)

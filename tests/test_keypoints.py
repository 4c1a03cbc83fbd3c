"""The keypoint STN (config 'stn_keypoints'): keypoints, their affine fit, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from istn.config import Config, validate
from istn.engine.checkpoint import check_weights
from istn.errors import IstnError
from istn.nets import STN
from istn.nets.keypoints import KeypointNet, anchors, fit_affine
from istn.spatial.grid import ALIGN_CORNERS


@pytest.mark.parametrize("dim", [2, 3])
def test_fit_affine_equals_numpys_least_squares(dim):
    g = torch.Generator().manual_seed(dim)
    q = torch.rand(3, 12, dim, generator=g, dtype=torch.float64) * 2 - 1
    p = torch.rand(3, 12, dim, generator=g, dtype=torch.float64) * 2 - 1
    theta = fit_affine(q, p, ridge=0.0)
    for b in range(3):
        qh = np.concatenate([q[b].numpy(), np.ones((12, 1))], axis=1)
        want = np.linalg.lstsq(qh, p[b].numpy(), rcond=None)[0].T
        np.testing.assert_allclose(theta[b].numpy(), want, atol=1e-5)


def test_fit_affine_recovers_an_affine_and_the_ridge_pulls_to_the_identity():
    g = torch.Generator().manual_seed(0)
    truth = torch.eye(3, 4) + 0.1 * torch.randn(2, 3, 4, generator=g)
    q = anchors(3, 3).expand(2, -1, -1)
    p = q @ truth[:, :, :3].transpose(1, 2) + truth[:, None, :, 3]
    assert torch.allclose(fit_affine(q, p), truth, atol=2e-3)  # the default ridge: tiny
    assert torch.allclose(fit_affine(q, p, ridge=1e-9), truth, atol=1e-5)
    far = fit_affine(q, p, ridge=1e6)  # all weight on the pull
    assert torch.allclose(far, torch.eye(3, 4).expand(2, -1, -1), atol=1e-4)


@pytest.mark.parametrize("shape", [(24, 28), (16, 20, 24)])
def test_an_untrained_keypoint_stn_is_the_identity(shape):
    stn = STN("affine", shape, 2, keypoints=3)
    x = torch.randn(2, 4, *shape)
    eye = torch.eye(len(shape), len(shape) + 1).expand(2, -1, -1)
    assert torch.allclose(stn(x), eye, atol=1e-5)
    stn(x).sum().backward()  # the last layer (zero at start) gets a gradient
    assert stn.keypoint_stn.keypoints.net[-1].weight.grad.abs().sum() > 0


def test_a_keypoint_is_the_centroid_of_its_map():
    shape = (16, 20, 24)
    net = KeypointNet(3, 1, shape, 2)
    coords = F.affine_grid(torch.eye(3, 4)[None], [1, 1, *shape],
                           align_corners=ALIGN_CORNERS)[0]  # [z, y, x, 3]
    # one sharp peak per keypoint channel at a known coarse cell (a quarter resolution)
    cells = [(0, 1, 2), (3, 4, 5), (1, 2, 3), (2, 0, 1), (3, 3, 3), (0, 0, 0), (1, 4, 5),
             (2, 2, 2)]
    logits = torch.full((1, 8, 4, 5, 6), -1e4)
    for k, (z, y, x) in enumerate(cells):
        logits[0, k, z, y, x] = 0.0

    class Learnt(torch.nn.Module):  # the logit maps, as if learnt
        def forward(self, x):
            return logits

    net.net = Learnt()
    kp = net(torch.zeros(1, 1, *shape))[0]
    for k, (z, y, x) in enumerate(cells):  # the mean of the 4x4x4 voxels of that cell
        want = coords[4 * z:4 * z + 4, 4 * y:4 * y + 4, 4 * x:4 * x + 4].reshape(-1, 3).mean(0)
        assert torch.allclose(kp[k], want, atol=1e-5)


def test_keypoints_that_move_by_an_affine_give_that_affine():
    shape = (16, 20, 24)
    stn = STN("affine", shape, 1, keypoints=2)
    truth = torch.tensor([[1.05, 0.02, 0.0, 0.1], [0.0, 0.95, 0.03, -0.05],
                          [0.01, 0.0, 1.0, 0.02]])
    q = anchors(2, 3) * 0.8
    p = q @ truth[:, :3].T + truth[:, 3]
    stn.keypoint_stn.keypoints.forward = lambda x: torch.stack([p, q])  # source, target
    assert torch.allclose(stn(torch.zeros(1, 2, *shape))[0], truth, atol=2e-3)


def test_keypoints_need_the_affine_and_two_per_axis():
    with pytest.raises(IstnError, match="stn_keypoints"):
        STN("bspline", (40, 40), 1, keypoints=3)
    with pytest.raises(IstnError, match="stn_keypoints"):
        validate(Config(stn_keypoints=1))
    with pytest.raises(IstnError, match="stn_keypoints"):
        validate(Config(stn_keypoints=-2))
    assert validate(Config(stn_keypoints=3)).stn_keypoints == 3


def test_weights_of_the_first_keypoint_layout_are_refused_with_a_way_out():
    # istn's first keypoint net began with a conv (net.0); today it pools first (net.1)
    stn = STN("affine", (16, 20), 1, keypoints=2)
    prefix = "keypoint_stn.keypoints.net."

    def shifted(k: str) -> str:  # net.1.weight -> net.0.weight
        if not k.startswith(prefix):
            return k
        i, rest = k[len(prefix):].split(".", 1)
        return f"{prefix}{int(i) - 1}.{rest}"

    old = {shifted(k): v for k, v in stn.state_dict().items()}
    with pytest.raises(IstnError, match="do not fit.*retrain"):
        check_weights(stn, old, "STN", "old.pt")
    check_weights(stn, stn.state_dict(), "STN", "new.pt")  # today's layout loads


def _blobs(g: torch.Generator, shape: tuple[int, ...], n: int = 6) -> torch.Tensor:
    """An image [1, 1, *shape] of ``n`` Gaussian blobs of different sizes (an 'anatomy')."""
    coords = F.affine_grid(torch.eye(2, 3)[None], [1, 1, *shape],
                           align_corners=ALIGN_CORNERS)[0]
    img = torch.zeros(shape)
    for _ in range(n):
        c = torch.rand(2, generator=g) - 0.5
        s = 0.08 + 0.12 * torch.rand(1, generator=g)
        img += torch.exp(-((coords - c) ** 2).sum(-1) / (2 * s ** 2))
    return img[None, None]


def _random_theta(g: torch.Generator, b: int) -> torch.Tensor:
    angle = (torch.rand(b, generator=g) - 0.5) * 0.4  # +-11 degrees
    scale = 1 + (torch.rand(b, 2, generator=g) - 0.5) * 0.2
    shift = (torch.rand(b, 2, generator=g) - 0.5) * 0.3
    cos, sin = torch.cos(angle), torch.sin(angle)
    lin = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return torch.cat([lin * scale[:, None], shift[..., None]], dim=-1)


def test_a_trained_keypoint_stn_registers_unseen_pairs_better_than_none():
    """Trained 300 steps on pairs of one 2D 'anatomy' under random affines (its own
    warped copy as target, MSE), the STN alone aligns unseen pairs: the mean error of
    its sampling map over the grid is at most a third of no registration's."""
    from istn.spatial import identity_grid, warp

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    shape = (40, 40)
    src = _blobs(g, shape)
    stn = STN("affine", shape, 1, keypoints=3)
    opt = torch.optim.Adam(stn.parameters(), lr=3e-3)
    grid = identity_grid(shape)[None]

    def pairs(b):
        theta = _random_theta(g, b)
        trg = warp(src.expand(b, -1, -1, -1), stn.transform.grid(theta))
        return theta, trg

    for _ in range(300):
        theta, trg = pairs(8)
        pred = stn(torch.cat([src.expand(8, -1, -1, -1), trg], dim=1))
        loss = F.mse_loss(warp(src.expand(8, -1, -1, -1), stn.transform.grid(pred)), trg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    theta, trg = pairs(16)
    with torch.no_grad():
        pred = stn(torch.cat([src.expand(16, -1, -1, -1), trg], dim=1))
    truth = stn.transform.grid(theta)
    err = (stn.transform.grid(pred) - truth).norm(dim=-1).mean()
    none = (grid - truth).norm(dim=-1).mean()
    assert err < none / 3, (float(err), float(none))

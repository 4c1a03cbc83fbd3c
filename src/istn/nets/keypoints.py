"""A keypoint STN for the affine model: keypoints in each image, their least-squares fit.

One network, shared by source and target (S', T' seen one at a time), marks ``K``
keypoints in an image: each is the expected position under a spatial softmax of one
output channel, i.e. the centroid of that channel's response. The affine sampling
matrix theta [B, dim, dim+1] (target -> source, normalised coordinates, as
:class:`istn.spatial.AffineModel`) is the ridge least-squares fit of the source
keypoints ``p_k`` as functions of the target keypoints ``q_k``:

    theta = argmin  sum_k |theta (q_k, 1) - p_k|^2 + ridge |theta - (I, 0)|^2

Why: a keypoint moves with the image (convolutions are translation-equivariant and
the centroid is sub-voxel), so the fitted affine follows the pair's motion instead of
being regressed from pooled features. Each channel's logits are biased by a fixed
Gaussian window around an anchor of a regular ``n^dim`` lattice, so at start every
keypoint is its anchor in both images: the identity (as the published head starts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spatial.grid import ALIGN_CORNERS
from .layers import avg_pool, conv

RIDGE = 1e-3  # weight of the pull towards the identity (keypoint coordinates are ~0.5)
LATTICE = 0.5  # anchors at -LATTICE..LATTICE (normalised units) along every axis


def fit_affine(target: torch.Tensor, source: torch.Tensor, ridge: float = RIDGE
               ) -> torch.Tensor:
    """theta [B, dim, dim+1] with ``theta (q, 1) ~ p`` for keypoints ``target`` q and
    ``source`` p [B, K, dim] (normalised x, y[, z]), by ridge least squares (float32)."""
    q, p = target.float(), source.float()
    b, k, dim = q.shape
    qh = torch.cat([q, q.new_ones(b, k, 1)], dim=-1)  # [B, K, dim+1]
    eye = torch.eye(dim + 1, dtype=q.dtype, device=q.device)
    gram = qh.transpose(1, 2) @ qh + ridge * eye
    rhs = qh.transpose(1, 2) @ p + ridge * eye[:, :dim]
    return torch.linalg.solve(gram, rhs).transpose(1, 2)


def anchors(n: int, dim: int) -> torch.Tensor:
    """The ``n^dim`` lattice anchors [K, dim] (normalised x, y[, z])."""
    axis = torch.linspace(-LATTICE, LATTICE, n)
    mesh = torch.meshgrid(*[axis] * dim, indexing="ij")
    return torch.stack([m.flatten() for m in mesh], dim=-1)


class KeypointNet(nn.Module):
    """Images [N, C, *shape] -> keypoints [N, n^dim, dim] (normalised x, y[, z]).

    Average pooling 2, conv3 + ReLU (8 channels), two conv3 + ReLU (16, 16), average
    pooling 2, conv3 + ReLU (32), then a conv3 to one logit map per keypoint at a
    quarter of the resolution; the softmax centroid of each map (plus its anchor's
    window) is the keypoint.
    """

    def __init__(self, dim: int, channels: int, shape: Sequence[int], n: int):
        super().__init__()
        width = [8, 16, 16, 32]
        k = n ** dim
        self.net = nn.Sequential(
            avg_pool(dim, 2), conv(dim, channels, width[0], 3, padding=1), nn.ReLU(),
            conv(dim, width[0], width[1], 3, padding=1), nn.ReLU(),
            conv(dim, width[1], width[2], 3, padding=1), nn.ReLU(), avg_pool(dim, 2),
            conv(dim, width[2], width[3], 3, padding=1), nn.ReLU(),
            conv(dim, width[3], k, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)  # start: the windows alone (the anchors)
        nn.init.zeros_(self.net[-1].bias)
        # the normalised coordinates of the coarse cells: the network grid's voxel
        # coordinates pooled as the features are (exact cell centres)
        eye = torch.eye(dim, dim + 1)[None]
        full = F.affine_grid(eye, [1, 1, *shape], align_corners=ALIGN_CORNERS)
        coords = full.movedim(-1, 1)
        for _ in range(2):
            coords = F.avg_pool2d(coords, 2) if dim == 2 else F.avg_pool3d(coords, 2)
        coords = coords.flatten(2).transpose(1, 2)[0]  # [cells, dim]
        a = anchors(n, dim)
        sigma = 2 * LATTICE / max(n - 1, 1)  # one anchor spacing
        window = -((coords[None] - a[:, None]) ** 2).sum(-1) / (2 * sigma ** 2)
        self.register_buffer("coords", coords, persistent=False)
        self.register_buffer("window", window, persistent=False)  # [K, cells]
        self.count = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x).float().flatten(2) + self.window  # [N, K, cells]
        return torch.softmax(logits, dim=-1) @ self.coords


class KeypointSTN(nn.Module):
    """``(S', T')`` [B, 2C, *shape] -> theta [B, dim, dim+1]: keypoints of each, fitted."""

    def __init__(self, dim: int, channels: int, shape: Sequence[int], n: int):
        super().__init__()
        self.keypoints = KeypointNet(dim, channels, shape, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1] // 2
        kp = self.keypoints(torch.cat([x[:, :c], x[:, c:]], dim=0))
        src, trg = kp.chunk(2, dim=0)
        with torch.autocast(x.device.type, enabled=False):
            return fit_affine(trg, src)

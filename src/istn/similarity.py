"""Registry of image similarity (dissimilarity) measures, used by training and refinement.

A similarity is a small class with one required method, ``per_pair(warped, target,
mask=None) -> [B]``: the dissimilarity of every pair of the batch (lower is better),
so that summing it over pairs keeps each pair's gradient its own (test-time
refinement optimises all pairs of a chunk together). ``mean`` is the batch loss that
training minimises; by default the mean of ``per_pair``.

Adding a measure is one class and one decorator line::

    @register_similarity("name")
    class Name(Similarity):
        def per_pair(self, warped, target, mask=None): ...

Tensors are ``[B, C, *spatial]``; ``mask`` (optional) is ``[B, 1 | C, *spatial]`` with
weights in [0, 1] (voxels outside have weight 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Registry

SIMILARITIES = Registry("similarity")


class Similarity:
    """Base class: ``per_pair`` is the dissimilarity [B]; ``mean`` its batch mean."""

    name = ""

    def per_pair(self, warped: torch.Tensor, target: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, warped: torch.Tensor, target: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.per_pair(warped, target, mask).mean()


register_similarity = SIMILARITIES.register


def new_similarity(name: str) -> Similarity:
    """An instance of the similarity registered as ``name``; IstnError naming the choices."""
    return SIMILARITIES.lookup(name)()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-pair mean [B] of ``values`` [B, C, ...], weighted by ``mask`` when given."""
    if mask is None:
        return values.flatten(1).mean(1)
    weights = mask.expand_as(values).flatten(1)
    return (values.flatten(1) * weights).sum(1) / weights.sum(1).clamp_min(1e-12)


@register_similarity("mse")
class MSE(Similarity):
    """Mean squared difference (the published loss everywhere)."""

    def per_pair(self, warped, target, mask=None):
        return _masked_mean((warped - target) ** 2, mask)

    def mean(self, warped, target, mask=None):
        if mask is None:  # one reduction over the batch, bit-identical to the published loss
            return F.mse_loss(warped, target)
        return super().mean(warped, target, mask)


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over the voxels of a cubic window of ``window`` voxels per axis (same size).

    At the borders the window is cut to the image (padding is not counted), so local
    statistics there are those of the voxels that exist. The cubic mean is computed as
    one 1-D mean per axis: a box is separable, and so is the count of its voxels inside
    the image, so this equals the direct cubic mean (``window`` operations per voxel
    and axis instead of ``window ** dim``).
    """
    dim = x.dim() - 2
    pool = (F.avg_pool2d, F.avg_pool3d)[dim - 2]
    for axis in range(dim):
        kernel = [1] * dim
        kernel[axis] = window
        pad = [k // 2 for k in kernel]
        x = pool(x, kernel, stride=1, padding=pad, count_include_pad=False)
    return x


@register_similarity("lncc")
class LNCC(Similarity):
    """1 - local normalised cross-correlation, over cubic windows of ``window`` voxels.

    Per window ``cc = cov(I, J)^2 / (var(I) var(J) + eps)`` (local means by box
    filtering, windows cut to the image at its borders); the dissimilarity is ``1 - mean(cc)`` over
    the voxels (of the mask, when given). Invariant to local affine intensity changes,
    so robust to bias fields and contrast differences between scans of one modality.
    """

    def __init__(self, window: int = 9, eps: float = 1e-5):
        if window < 1 or window % 2 == 0:
            raise ValueError(f"LNCC window must be odd and >= 1, got {window}")
        self.window, self.eps = window, eps

    def per_pair(self, warped, target, mask=None):
        # the five local means in one filtering pass (channels stacked)
        c = warped.shape[1]
        stats = torch.cat([warped, target, warped * warped, target * target,
                           warped * target], 1)
        mi, mj, mii, mjj, mij = box_mean(stats, self.window).split(c, 1)
        cov = mij - mi * mj
        var_i = (mii - mi * mi).clamp_min(0)
        var_j = (mjj - mj * mj).clamp_min(0)
        cc = cov * cov / (var_i * var_j + self.eps)
        return 1.0 - _masked_mean(cc, mask)


@register_similarity("mi")
class MutualInformation(Similarity):
    """Negative mutual information of a Parzen-window joint histogram (Mattes-style).

    Each image of a pair is scaled to [0, 1] by its own minimum and maximum (of the
    mask's voxels, when given); every voxel adds Gaussian weights (standard deviation
    one bin width) to ``bins`` evenly spaced bins of each image; ``p(a, b)`` is the
    normalised sum of the products and ``MI = sum p(a,b) log(p(a,b) / (p(a) p(b)))``.
    The dissimilarity is ``-MI`` (nats). For pairs of different modalities.
    """

    def __init__(self, bins: int = 32):
        self.bins = bins

    def _weights(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        flat = x.flatten(1)  # [B, N]
        m = mask.expand_as(x).flatten(1) > 0 if mask is not None else None
        big = torch.finfo(x.dtype).max
        lo = (flat if m is None else torch.where(m, flat, big)).amin(1, keepdim=True)
        hi = (flat if m is None else torch.where(m, flat, -big)).amax(1, keepdim=True)
        u = (flat - lo) / (hi - lo).clamp_min(1e-12)
        centres = torch.linspace(0, 1, self.bins, dtype=x.dtype, device=x.device)
        sigma = 1.0 / (self.bins - 1)
        w = torch.exp(-0.5 * ((u[..., None] - centres) / sigma) ** 2)  # [B, N, bins]
        w = w / w.sum(-1, keepdim=True)
        return w if m is None else w * m[..., None]

    def per_pair(self, warped, target, mask=None):
        wa, wb = self._weights(warped, mask), self._weights(target, mask)
        joint = wa.transpose(1, 2) @ wb  # [B, bins, bins]
        joint = joint / joint.sum((1, 2), keepdim=True).clamp_min(1e-12)
        pa, pb = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
        eps = 1e-12
        mi = (joint * (torch.log(joint + eps) - torch.log(pa * pb + eps))).sum((1, 2))
        return -mi

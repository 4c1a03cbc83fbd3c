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
weights in [0, 1] (voxels outside have weight 0). Several channels are several
structures (a multi-label SoI, config 'labels'): every measure's dissimilarity is the
mean over channels of the dissimilarity of each channel.

A name ``"a+b"`` (e.g. ``"mse+dice"``) is the sum of the registered measures ``a`` and
``b`` (:func:`new_similarity`, :func:`check_similarity`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .filters import box_mean
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
    """An instance of the similarity registered as ``name``; IstnError naming the choices.

    ``"a+b"`` (any number of registered names joined by ``+``) is their sum.
    """
    parts = name.split("+")
    if len(parts) == 1:
        return SIMILARITIES.lookup(name)()
    return Sum([SIMILARITIES.lookup(part)() for part in parts])


def check_similarity(name: str) -> str | None:
    """None if ``name`` is a registered measure or a ``+``-sum of them; else what is wrong."""
    bad = [part for part in name.split("+") if part not in SIMILARITIES]
    if bad:
        return (f"'{bad[0]}' is no registered similarity; use one of {', '.join(SIMILARITIES)} "
                "or a sum such as 'mse+dice'")
    return None


class Sum(Similarity):
    """The sum of several measures (config ``"mse+dice"``), pair by pair."""

    def __init__(self, parts: list[Similarity]):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)

    def per_pair(self, warped, target, mask=None):
        return torch.stack([p.per_pair(warped, target, mask) for p in self.parts]).sum(0)

    def mean(self, warped, target, mask=None):
        return torch.stack([p.mean(warped, target, mask) for p in self.parts]).sum()


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
        if warped.shape[1] > 1:  # one histogram per structure, not one of all channels
            return _channel_mean(self, warped, target, mask)
        wa, wb = self._weights(warped, mask), self._weights(target, mask)
        joint = wa.transpose(1, 2) @ wb  # [B, bins, bins]
        joint = joint / joint.sum((1, 2), keepdim=True).clamp_min(1e-12)
        pa, pb = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
        eps = 1e-12
        mi = (joint * (torch.log(joint + eps) - torch.log(pa * pb + eps))).sum((1, 2))
        return -mi


def _channel_mean(sim: Similarity, warped: torch.Tensor, target: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over channels of ``sim.per_pair`` of each channel [B]."""
    def m(c: int) -> torch.Tensor | None:
        return None if mask is None else mask[:, c:c + 1] if mask.shape[1] > 1 else mask

    return torch.stack([sim.per_pair(warped[:, c:c + 1], target[:, c:c + 1], m(c))
                        for c in range(warped.shape[1])]).mean(0)


@register_similarity("dice")
class Dice(Similarity):
    """1 - soft Dice, per channel (structure), averaged over channels.

    Per pair and channel, over the voxels (weighted by the mask when given):
    ``dice = (2 sum(x y) + eps) / (sum(x^2) + sum(y^2) + eps)`` (the squared form,
    MONAI ``DiceLoss(squared_pred=True)``, V-Net): unlike ``sum(x) + sum(y)`` it does not
    change when both maps are scaled alike (SoI in 0..255 units), stays in [-1, 1] for
    maps with negative values (ITN outputs are linear), equals the binary Dice on 0/1
    maps, and two empty maps give 1. The dissimilarity is ``1 - mean over channels``.
    """

    def __init__(self, eps: float = 1e-5):
        self.eps = eps

    def per_pair(self, warped, target, mask=None):
        w = torch.ones_like(warped[:, :1]) if mask is None else mask
        w = w.expand_as(warped)
        inter = (warped * target * w).flatten(2).sum(2)  # [B, C]
        norm = ((warped * warped + target * target) * w).flatten(2).sum(2)
        dice = (2 * inter + self.eps) / (norm + self.eps)
        return 1.0 - dice.mean(1)

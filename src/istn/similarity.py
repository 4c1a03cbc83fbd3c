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

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import IstnError

SIMILARITIES: dict[str, type[Similarity]] = {}


class Similarity:
    """Base class: ``per_pair`` is the dissimilarity [B]; ``mean`` its batch mean."""

    name = ""

    def per_pair(self, warped: torch.Tensor, target: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, warped: torch.Tensor, target: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.per_pair(warped, target, mask).mean()


def register_similarity(name: str) -> Callable[[type[Similarity]], type[Similarity]]:
    """Class decorator: make the similarity available under ``name`` (config 'similarity')."""
    def add(cls: type[Similarity]) -> type[Similarity]:
        if name in SIMILARITIES:
            raise ValueError(f"similarity '{name}' is registered twice")
        cls.name = name
        SIMILARITIES[name] = cls
        return cls
    return add


def new_similarity(name: str) -> Similarity:
    """An instance of the similarity registered as ``name``; IstnError naming the choices."""
    if name not in SIMILARITIES:
        raise IstnError(f"similarity '{name}' is unknown; use one of {', '.join(SIMILARITIES)}")
    return SIMILARITIES[name]()


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

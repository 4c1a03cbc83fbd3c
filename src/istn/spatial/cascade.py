"""Cascades: an affine stage, then a deformable stage on the affine-warped pair.

The sampling map (target -> source) of ``affine+svf`` is ``phi = A o (id + u)``: a
target point is first moved by the deformable stage (in target space), then mapped by
the affine ``A`` into the source. Each stage has its own STN (see :class:`istn.nets.STN`):
the first sees (S', T'), the second the source warped by the first and T'. The
parameters of one pair are the stages' parameters flattened and concatenated, so
refinement (both modes) optimises the stages together. Non-linear, so exported as a
displacement field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch

from . import affine, bspline, svf  # noqa: F401 (registers the stage models first)
from .base import TRANSFORMATIONS, Transformation, register_transformation


class Cascade(Transformation):
    """Base of ``first+second`` cascades; subclasses name the stage models."""

    first: ClassVar[str] = "affine"
    second: ClassVar[str] = ""

    def __init__(self, shape: Sequence[int], **options):
        super().__init__(shape)
        kinds = (TRANSFORMATIONS[self.first], TRANSFORMATIONS[self.second])
        self.stages = tuple(k(shape, **{a: v for a, v in options.items() if a in k.options})
                            for k in kinds)
        for i, stage in enumerate(self.stages):  # buffers move with the model
            self.add_module(f"stage{i}", stage)
        self.sizes = [math.prod(s.params_shape) for s in self.stages]

    @property
    def params_shape(self) -> tuple[int, ...]:
        return (sum(self.sizes),)

    def pack(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.flatten(1) for p in parts], dim=1)

    def split(self, params: torch.Tensor) -> list[torch.Tensor]:
        """The stages' parameters of ``params`` [B, P], each in its own shape."""
        chunks = params.split(self.sizes, dim=1)
        return [c.reshape(len(params), *s.params_shape) for c, s in zip(chunks, self.stages,
                                                                        strict=True)]

    def grid(self, params: torch.Tensor) -> torch.Tensor:
        a, d = self.split(params)
        g = self.stages[1].grid(d)
        return self.stages[0].map_points(a, g.reshape(len(g), -1, self.dim)).reshape(g.shape)

    def map_points(self, params: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        a, d = self.split(params)
        return self.stages[0].map_points(a, self.stages[1].map_points(d, points))

    def inverse_map_points(self, params: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        a, d = self.split(params)
        return self.stages[1].inverse_map_points(d, self.stages[0].inverse_map_points(a, points))

    def deformation(self, params: torch.Tensor) -> torch.Tensor | None:
        return self.stages[1].deformation(self.split(params)[1])

    def regularisation(self, params: torch.Tensor, per_pair: bool = False) -> torch.Tensor:
        """The deformable stage's diffusion penalty (the affine stage has none)."""
        return self.stages[1].regularisation(self.split(params)[1], per_pair)

    def bending(self, params: torch.Tensor, per_pair: bool = False) -> torch.Tensor:
        """The deformable stage's bending energy."""
        return self.stages[1].bending(self.split(params)[1], per_pair)

    def stage_grid(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The sampling grid of the stages predicted so far (``parts``), for the next stage."""
        if len(parts) == 1:
            return self.stages[0].grid(parts[0])
        return self.grid(self.pack(parts))


def _cascade(first: str, second: str) -> type[Cascade]:
    name = f"{first}+{second}"
    cls = type(f"Cascade_{first}_{second}", (Cascade,), {
        "first": first, "second": second,
        "options": {**TRANSFORMATIONS[first].options, **TRANSFORMATIONS[second].options},
        "__doc__": f"Cascade: {first}, then {second} on the {first}-warped pair."})
    return register_transformation(name)(cls)


AffineBSpline = _cascade("affine", "bspline")
AffineSVF = _cascade("affine", "svf")

"""The transformation-model protocol and its registry.

A transformation model lives on a network grid of array shape ``shape`` (z, y, x) and
turns parameters into a sampling map ``phi`` from target to source, in normalised
coordinates (x, y[, z]; ``align_corners=True``). Prediction (an STN head's output),
test-time refinement (the parameters optimised directly) and export share this one
path. A model names:

- ``head(features)``: the STN head, encoder features [B, F] -> parameters [B, ...];
- ``grid(params)``: the sampling grid [B, *shape, dim] for ``warp``;
- ``map_points`` / ``inverse_map_points``: ``phi`` and its inverse on points [B, N, dim];
- ``deformation(params)``: the dense field the regularisers act on (displacement;
  SVF: velocity), None for linear models; ``regularisation`` is its diffusion and
  ``bending`` its bending energy (both 0 for linear models);
- ``linear_matrix(params)``: the normalised sampling matrices [B, dim, dim+1] of a
  linear model (exported as one ITK ``AffineTransform``), None otherwise (exported as a
  displacement field);
- ``params_shape``: the shape of one pair's parameters;
- ``stages``: for a cascade, its stage models (each predicted by its own STN on the
  source warped by the stages before it); empty for a single model.

``options`` maps the constructor's keyword arguments to config keys, which feeds the
config (``Config.stn_options``), the checkpoint checks and the command line. A new
model is one file with a class decorated by ``@register_transformation("name")``
(and, for a built-in, its import in ``spatial/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn as nn
from torch.func import jvp, vmap

from ..registry import Registry
from .penalties import bending, diffusion

TRANSFORMATIONS = Registry("transformation")


class Transformation(nn.Module):
    """Base class of transformation models (see the module docstring)."""

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, str]] = {}
    stages: tuple[Transformation, ...] = ()

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(n) for n in shape)
        self.dim = len(self.shape)

    @property
    def params_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def head(self, features: int) -> nn.Module:
        raise NotImplementedError

    def pack(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """A cascade's parameters from its stages' (one tensor [B, P]); single models: as is."""
        return parts[0]

    def grid(self, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def map_points(self, params: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def map_points_jacobian(self, params: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """d map_points / d params [B, N, dim, P] (params flattened; pairs do not interact):
        one forward-mode product per parameter. Models override it with a closed form."""
        shape = params.shape
        flat = params.detach().reshape(len(params), -1)

        def mapped(t: torch.Tensor) -> torch.Tensor:
            return self.map_points(t.view(shape), points)

        tangents = torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device)[:, None]
        columns = vmap(lambda t: jvp(mapped, (flat,), (t.expand_as(flat),))[1])(tangents)
        return columns.permute(1, 2, 3, 0)

    def inverse_map_points(self, params: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def deformation(self, params: torch.Tensor) -> torch.Tensor | None:
        return None

    def regularisation(self, params: torch.Tensor, per_pair: bool = False) -> torch.Tensor:
        """Diffusion penalty of ``deformation`` (see :mod:`.penalties`; [B] per pair)."""
        field = self.deformation(params)
        if field is None:
            return params.new_zeros((len(params),) if per_pair else ())
        return diffusion(field, per_pair)

    def bending(self, params: torch.Tensor, per_pair: bool = False) -> torch.Tensor:
        """Bending energy of ``deformation`` (see :mod:`.penalties`; [B] per pair)."""
        field = self.deformation(params)
        if field is None:
            return params.new_zeros((len(params),) if per_pair else ())
        return bending(field, per_pair)

    def linear_matrix(self, params: torch.Tensor) -> torch.Tensor | None:
        return None


register_transformation = TRANSFORMATIONS.register
transformation_class = TRANSFORMATIONS.lookup


def new_transformation(name: str, shape: Sequence[int], **options) -> Transformation:
    """Build the transformation model ``name`` on a grid of array ``shape``."""
    return transformation_class(name)(shape, **options)

"""Spatial transformations: grids, warping and the registry of transformation models.

Convention (used everywhere, tested): PyTorch ``grid_sample`` with
``align_corners=True``; normalised coordinates run from -1 at the centre of the
first voxel to +1 at the centre of the last voxel along each axis, and are
ordered (x, y[, z]) while tensors are ``[B, C, *spatial]`` with spatial order
(z, y, x) as in SimpleITK arrays. Importing this package registers the built-in
models (affine, bspline, svf, affine+bspline, affine+svf).
"""

from .affine import AffineModel, affine_matrix
from .base import (
    TRANSFORMATIONS,
    Transformation,
    new_transformation,
    register_transformation,
    transformation_class,
)
from .bspline import BSplineModel, bspline_basis, control_grid_shape, cubic_bspline
from .cascade import Cascade
from .grid import ALIGN_CORNERS, identity_grid, index_to_normalised, normalised_to_index, warp
from .svf import SVFModel, exp_velocity

__all__ = [
    "ALIGN_CORNERS",
    "TRANSFORMATIONS",
    "AffineModel",
    "BSplineModel",
    "Cascade",
    "SVFModel",
    "Transformation",
    "affine_matrix",
    "bspline_basis",
    "control_grid_shape",
    "cubic_bspline",
    "exp_velocity",
    "identity_grid",
    "index_to_normalised",
    "new_transformation",
    "normalised_to_index",
    "register_transformation",
    "transformation_class",
    "warp",
]

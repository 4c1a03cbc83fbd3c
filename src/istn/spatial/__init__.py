"""Spatial transformations: grids, warping, affine and cubic B-spline models.

Convention (used everywhere, tested): PyTorch ``grid_sample`` with
``align_corners=True``; normalised coordinates run from -1 at the centre of the
first voxel to +1 at the centre of the last voxel along each axis, and are
ordered (x, y[, z]) while tensors are ``[B, C, *spatial]`` with spatial order
(z, y, x) as in SimpleITK arrays.
"""

from .affine import AffineModel, affine_matrix
from .bspline import BSplineModel, bspline_basis, control_grid_shape, cubic_bspline
from .grid import ALIGN_CORNERS, identity_grid, index_to_normalised, normalised_to_index, warp

__all__ = [
    "ALIGN_CORNERS",
    "AffineModel",
    "BSplineModel",
    "affine_matrix",
    "bspline_basis",
    "control_grid_shape",
    "cubic_bspline",
    "identity_grid",
    "index_to_normalised",
    "normalised_to_index",
    "warp",
]

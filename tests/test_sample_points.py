"""``sample_points`` against ``torch.nn.functional.grid_sample``: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from istn.spatial.grid import sample_points


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 8)])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_values_and_gradients_equal_grid_sample(shape, padding):
    gen = torch.Generator().manual_seed(0)
    dim = len(shape)
    image = torch.rand(2, 3, *shape, generator=gen, dtype=torch.float64, requires_grad=True)
    # inside, near and beyond the borders, and exactly on voxel centres and edges
    points = torch.rand(2, 40, dim, generator=gen, dtype=torch.float64) * 2.6 - 1.3
    points[:, :4] = torch.tensor([-1.0, 1.0, 0.0, -1.0])[:4, None].expand(4, dim)
    points.requires_grad_(True)
    got = sample_points(image, points, padding)
    where = points.view(2, 40, *[1] * (dim - 1), dim)
    want = F.grid_sample(image, where, padding_mode=padding, align_corners=True).view(2, 3, 40)
    assert torch.allclose(got, want, atol=1e-12)
    weights = torch.rand(2, 3, 40, generator=gen, dtype=torch.float64)
    g_got = torch.autograd.grad((got * weights).sum(), (image, points))
    g_want = torch.autograd.grad((want * weights).sum(), (image, points))
    # grid_sample's gradient at points exactly on a voxel edge is one-sided; skip those
    assert torch.allclose(g_got[0], g_want[0], atol=1e-12)
    assert torch.allclose(g_got[1][:, 4:], g_want[1][:, 4:], atol=1e-10)


def test_unknown_padding_is_refused():
    with pytest.raises(ValueError, match="padding"):
        sample_points(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 2), "reflection")

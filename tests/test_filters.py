"""Separable filters (istn.filters) against scipy.ndimage."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from istn.filters import box_mean, gaussian_blur


@pytest.mark.parametrize("shape", [(9, 14), (7, 11, 6)])
def test_box_mean_is_the_mean_of_the_window_cut_to_the_image(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, *shape))
    got = box_mean(torch.from_numpy(x), 5).numpy()
    size = (1, 1, *[5] * len(shape))
    # scipy counts zero padding; dividing by the filtered ones cuts the window
    want = (ndimage.uniform_filter(x, size, mode="constant")
            / ndimage.uniform_filter(np.ones_like(x), size, mode="constant"))
    np.testing.assert_allclose(got, want, atol=1e-10)


def test_gaussian_blur_3d_matches_scipy_away_from_the_borders_and_has_gradients():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 1, 30, 26, 28))
    t = torch.from_numpy(x).requires_grad_(True)
    got = gaussian_blur(t, 2.0)
    want = ndimage.gaussian_filter(x[0, 0], 2.0, truncate=3.0)
    inner = (slice(7, -7),) * 3
    np.testing.assert_allclose(got[0, 0].detach().numpy()[inner], want[inner], atol=1e-10)
    got.sum().backward()  # each row sums to one, so the column sums are the gradient
    assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_filters_keep_constants_and_sizes():
    ones = torch.ones(2, 1, 5, 40, 3)
    for y in (box_mean(ones, 9), gaussian_blur(ones, 4.0)):
        assert y.shape == ones.shape
        torch.testing.assert_close(y, ones)

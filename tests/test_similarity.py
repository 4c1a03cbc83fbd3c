"""Similarity measures of the registry against independent numpy/scipy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from istn.similarity import SIMILARITIES, new_similarity


def smooth_image(shape, seed=0):
    """Smooth noise scaled to [0, 1] (the contrast of a normalised scan)."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random(shape), 2.0)
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float64)


def test_registry_names_and_unknown_name():
    from istn.errors import IstnError

    assert {"mse", "lncc", "mi"} <= set(SIMILARITIES)
    with pytest.raises(IstnError, match="unknown; use one of mse"):
        new_similarity("ncc2")


def test_mse_mean_is_the_published_loss_and_per_pair_its_parts():
    a, b = torch.rand(3, 1, 8, 9), torch.rand(3, 1, 8, 9)
    sim = new_similarity("mse")
    assert torch.equal(sim.mean(a, b), F.mse_loss(a, b))
    np.testing.assert_allclose(sim.per_pair(a, b).numpy(),
                               ((a - b) ** 2).flatten(1).mean(1).numpy(), rtol=1e-6)
    mask = torch.zeros(3, 1, 8, 9)
    mask[..., :4, :] = 1
    want = ((a - b) ** 2)[..., :4, :].flatten(1).mean(1)
    np.testing.assert_allclose(sim.per_pair(a, b, mask).numpy(), want.numpy(), rtol=1e-6)


@pytest.mark.parametrize("shape", [(20, 24), (12, 14, 16)])
def test_lncc_against_scipy_box_filters(shape):
    i, j = smooth_image(shape, 0), smooth_image(shape, 1)
    w, eps = 5, 1e-5

    def box(x):  # mean over the window's voxels inside the image
        def total(y):
            return ndimage.uniform_filter(y, size=w, mode="constant", cval=0.0)
        return total(x) / total(np.ones_like(x))

    mi, mj = box(i), box(j)
    cov = box(i * j) - mi * mj
    cc = cov ** 2 / (np.clip(box(i * i) - mi ** 2, 0, None) *
                     np.clip(box(j * j) - mj ** 2, 0, None) + eps)
    want = 1 - cc.mean()
    sim = type(new_similarity("lncc"))(window=w, eps=eps)
    got = sim.per_pair(torch.from_numpy(i)[None, None], torch.from_numpy(j)[None, None])
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_lncc_ignores_affine_intensity_changes_and_is_lower_for_aligned_images():
    i = torch.from_numpy(smooth_image((32, 32), 0))[None, None]
    sim = new_similarity("lncc")
    same = sim.per_pair(i, 3.0 * i + 7.0).item()
    shifted = sim.per_pair(i, torch.roll(i, 4, dims=-1)).item()
    assert same < 0.01 < shifted


def numpy_parzen_mi(a: np.ndarray, b: np.ndarray, bins: int) -> float:
    """MI of Gaussian-Parzen joint histograms, written independently with numpy."""
    def weights(x):
        u = (x.ravel() - x.min()) / (x.max() - x.min())
        centres = np.linspace(0, 1, bins)
        w = np.exp(-0.5 * ((u[:, None] - centres[None]) * (bins - 1)) ** 2)
        return w / w.sum(1, keepdims=True)

    joint = weights(a).T @ weights(b)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())


def test_mutual_information_against_numpy():
    a, b = smooth_image((24, 20), 0), smooth_image((24, 20), 1)
    b = b + 0.5 * a  # some dependence
    got = new_similarity("mi").per_pair(torch.from_numpy(a)[None, None],
                                        torch.from_numpy(b)[None, None]).item()
    assert -got == pytest.approx(numpy_parzen_mi(a, b, 32), rel=1e-4)


def test_mutual_information_prefers_aligned_images_under_a_nonlinear_intensity_map():
    a = torch.from_numpy(smooth_image((32, 32), 0))[None, None]
    sim = new_similarity("mi")
    remapped = torch.exp(-3 * a)  # another "modality": a monotone decreasing map
    aligned = sim.per_pair(a, remapped).item()
    shifted = sim.per_pair(a, torch.roll(remapped, 5, dims=-1)).item()
    assert aligned < shifted


@pytest.mark.parametrize("name", ["mse", "lncc", "mi"])
def test_per_pair_values_are_independent_and_differentiable(name):
    a = torch.rand(2, 1, 16, 16, requires_grad=True)
    b = torch.rand(2, 1, 16, 16)
    sim = new_similarity(name)
    both = sim.per_pair(a, b)
    alone = sim.per_pair(a[1:], b[1:])
    assert both.shape == (2,)
    assert both[1].item() == pytest.approx(alone.item(), rel=1e-5)
    both.sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0

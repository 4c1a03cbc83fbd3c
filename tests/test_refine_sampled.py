"""Refinement on sampled voxels and on locally standardised images.

``sample_voxels`` is checked against ``grid_sample`` at its own points, the sampled
loss against the dense loss on the same voxels, ``local_standardise`` against a direct
window computation (scipy), and refinement with samples must recover a known 3D
translation as the dense refinement does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from istn.config import load_config
from istn.engine.model import Model
from istn.engine.refine import (
    RefineSettings,
    _sampled_losses,
    local_standardise,
    refine,
    sample_voxels,
)
from istn.errors import IstnError
from istn.similarity import new_similarity


def _blobs(shape: list[int], shift: tuple[float, ...] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """A smooth asymmetric pattern [1, 1, *shape], moved by ``shift`` voxels (x, y, z)."""
    axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape],
                          indexing="ij")
    zyx = list(axes)
    out = torch.zeros(shape)
    for centre, r, a in [((0.35, 0.4, 0.45), 5.0, 1.0), ((0.6, 0.55, 0.5), 4.0, 0.7),
                         ((0.5, 0.7, 0.3), 3.0, 0.5)]:
        d2 = sum((zyx[k] - (c * shape[k] + shift[len(shape) - 1 - k])) ** 2
                 for k, c in enumerate(centre))
        out = out + a * torch.exp(-d2 / (2 * r * r))
    return out[None, None]


@pytest.mark.parametrize("shape", [[20, 24], [12, 16, 20]])
def test_sampled_values_are_the_target_at_the_sampled_points(shape):
    target = torch.rand(2, 3, *shape)
    points, values = sample_voxels(target, 50, seed=3)
    assert points.shape == (2, 50, len(shape)) and values.shape == (2, 3, 50)
    where = points.view(2, 50, *[1] * (len(shape) - 1), len(shape))
    again = F.grid_sample(target, where, align_corners=True).flatten(2)
    torch.testing.assert_close(again, values, atol=1e-5, rtol=0)
    # reproducible: the same seed draws the same voxels
    torch.testing.assert_close(sample_voxels(target, 50, seed=3)[0], points)


@pytest.mark.parametrize("shape", [[21, 25], [13, 17, 21]])
def test_strided_samples_are_fine_voxels_near_the_drawn_cells(shape):
    target = torch.zeros(2, 1, *shape)
    cube = (..., *[slice(4, 9)] * len(shape))
    target[cube] = torch.rand(target[cube].shape) + 1.0  # structure only here
    points, values = sample_voxels(target, 300, seed=2, stride=2)
    sizes = torch.tensor(shape[::-1], dtype=torch.float32)
    vox = (points + 1) / 2 * (sizes - 1)  # x, y[, z] voxel indices
    torch.testing.assert_close(vox, vox.round(), atol=1e-4, rtol=0)  # on the fine grid
    # cells are drawn where the coarse (every 2nd voxel) grid sees structure: within
    # a cell's width of the cube's edges
    assert bool(((vox.round() >= 1) & (vox.round() <= 11)).all())
    where = points.view(2, 300, *[1] * (len(shape) - 1), len(shape))
    again = F.grid_sample(target, where, align_corners=True).flatten(2)
    torch.testing.assert_close(again, values, atol=1e-5, rtol=0)
    # every offset inside the cells is drawn
    assert len(torch.unique(vox.round().long() % 2)) == 2


def test_flat_background_is_never_sampled():
    target = torch.zeros(1, 1, 16, 16, 16)
    target[..., 4:8, 4:8, 4:8] = 1.0  # structure only near this cube
    points, _ = sample_voxels(target, 400, seed=0)
    vox = (points[0] + 1) / 2 * 15  # x, y, z voxel indices
    assert bool(((vox >= 2) & (vox <= 9)).all())  # within 1 voxel of the cube's edges


def test_sampled_loss_equals_the_dense_loss_on_the_same_voxels():
    torch.manual_seed(0)
    cfg = load_config(None, {"size": [44, 40, 36], "spacing": [1.0] * 3})
    model = Model.build(cfg, "i", "affine")
    src, trg = torch.rand(2, 1, 36, 40, 44), torch.rand(2, 1, 36, 40, 44)
    theta = torch.eye(3, 4).repeat(2, 1, 1)
    theta[:, :, 3] = torch.tensor([0.1, -0.05, 0.02])
    points, values = sample_voxels(trg, 300, seed=1)
    got = _sampled_losses(model, src, points, values, new_similarity("mse"), theta)
    dense = F.grid_sample(src, model.stn.grid(theta), align_corners=True)
    where = points.view(2, 300, 1, 1, 3)
    expect = ((F.grid_sample(dense - trg, where, align_corners=True)) ** 2).flatten(1).mean(1)
    # the dense warp sampled at voxel centres is the warp at those voxels
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)


def test_local_standardise_matches_a_direct_window_computation_and_ignores_gain():
    rng = np.random.default_rng(0)
    x = rng.random((10, 12, 14)).astype(np.float64)
    got = local_standardise(torch.from_numpy(x)[None, None], window=5, floor=0.0)[0, 0]
    # windows cut at the borders: nan padding dropped
    mean = ndimage.generic_filter(x, np.nanmean, size=5, mode="constant", cval=np.nan)
    std = ndimage.generic_filter(x, np.nanstd, size=5, mode="constant", cval=np.nan)
    np.testing.assert_allclose(got.numpy(), (x - mean) / std, atol=1e-6)
    y = torch.from_numpy(3.0 * x + 7.0)[None, None]
    torch.testing.assert_close(local_standardise(y, 5), local_standardise(
        torch.from_numpy(x)[None, None], 5), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("inputs", ["images", "local"])
def test_sampled_refinement_recovers_a_known_3d_translation(inputs):
    torch.manual_seed(0)
    shape = [36, 36, 36]
    cfg = load_config(None, {"size": shape, "spacing": [1.0] * 3})
    model = Model.build(cfg, "i", "affine")
    model.train(False)
    shift = (2.0, -1.5, 1.0)  # voxels, x y z: the source holds the pattern moved by this
    trg, src = _blobs(shape), _blobs(shape, shift)
    if inputs == "local":
        src = 0.5 + 2.0 * src  # a gain and an offset that only 'local' ignores
    settings = RefineSettings(300, 0.01, "params", inputs=inputs, samples=3000)
    zero = torch.zeros_like(trg)  # the network's inputs (S', T') play no part here
    with torch.no_grad():
        start = model.params(zero, zero)
    theta = refine(model, zero, zero, settings, progress=False, images=(src, trg))
    assert not torch.equal(theta, start)
    # theta's translation column in normalised units -> voxels: x * (n - 1) / 2
    got = theta[0, :, 3] * (torch.tensor(shape, dtype=torch.float32) - 1) / 2
    np.testing.assert_allclose(got.numpy(), shift, atol=0.3)


def test_samples_with_lncc_are_refused_naming_the_key():
    with pytest.raises(IstnError, match="refine_samples"):
        load_config(None, {"refine_samples": 100, "refine_similarity": "lncc"})


def test_gaussian_blur_matches_scipy_inside_and_keeps_constants_at_the_borders():
    from istn.filters import gaussian_blur

    rng = np.random.default_rng(1)
    x = rng.random((18, 20, 22))
    got = gaussian_blur(torch.from_numpy(x)[None, None], 1.5)[0, 0].numpy()
    ref = ndimage.gaussian_filter(x, 1.5, truncate=3.0, mode="constant")
    inner = (slice(5, -5),) * 3  # beyond the kernel's reach of the borders
    np.testing.assert_allclose(got[inner], ref[inner], atol=1e-4)
    ones = gaussian_blur(torch.ones(1, 1, 10, 12), 2.0)
    torch.testing.assert_close(ones, torch.ones_like(ones))


def test_level_schedule():
    from istn.engine.refine import level_schedule

    assert level_schedule(1, 50) == ([0.0], [50])
    assert level_schedule(3, 100) == ([4.0, 2.0, 0.0], [33, 33, 34])


def test_coarse_levels_capture_a_shift_that_one_level_misses():
    """Discs 9 voxels apart do not overlap (no gradient); blurring first makes them touch."""
    torch.manual_seed(0)
    shape = [40, 40]
    cfg = load_config(None, {"size": shape, "spacing": [1.0, 1.0]})
    model = Model.build(cfg, "i", "affine")
    model.train(False)
    axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape],
                          indexing="ij")

    def disc(cx: float, cy: float) -> torch.Tensor:
        d = ((axes[1] - cx) ** 2 + (axes[0] - cy) ** 2).sqrt()
        return torch.sigmoid((3.0 - d) / 0.3)[None, None]

    trg, src = disc(16.0, 20.0), disc(25.0, 20.0)  # the source is 9 voxels further in x
    zero = torch.zeros_like(trg)
    errors = {}
    for levels in (1, 3):
        settings = RefineSettings(300, 0.01, "params", inputs="images", levels=levels)
        theta = refine(model, zero, zero, settings, progress=False, images=(src, trg))
        errors[levels] = abs(float(theta[0, 0, 2]) * (shape[1] - 1) / 2 - 9.0)
    assert errors[3] < 0.3 < errors[1], errors


def test_a_finer_grid_names_the_same_physical_points_in_normalised_coordinates():
    import SimpleITK as sitk

    from istn.data import Geometry, finer_grid

    grid = sitk.Image([10, 12, 8], sitk.sitkFloat32)
    grid.SetOrigin([3.0, -2.0, 5.0])
    grid.SetSpacing([3.0, 2.0, 4.0])
    grid.SetDirection(sitk.VersorTransform((0.2, 0.3, 0.1), 0.4).GetMatrix())
    fine = finer_grid(Geometry.of(grid), 3)
    assert list(fine.GetSize()) == [28, 34, 22]
    for u in ([-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [0.3, -0.6, 0.9]):
        idx = [(v + 1) / 2 * (n - 1) for v, n in zip(u, grid.GetSize(), strict=True)]
        idx_f = [(v + 1) / 2 * (n - 1) for v, n in zip(u, fine.GetSize(), strict=True)]
        np.testing.assert_allclose(fine.TransformContinuousIndexToPhysicalPoint(idx_f),
                                   grid.TransformContinuousIndexToPhysicalPoint(idx),
                                   atol=1e-9)


def test_refinement_on_finer_images_recovers_a_sub_voxel_shift():
    """Primes on a 36^3 grid, images twice as fine: the shift is found on the fine images."""
    torch.manual_seed(0)
    shape = [36, 36, 36]
    cfg = load_config(None, {"size": shape, "spacing": [2.0] * 3})
    model = Model.build(cfg, "i", "affine")
    model.train(False)
    fine = [71, 71, 71]
    shift = (1.3, -0.7, 0.9)  # fine voxels (0.65, -0.35, 0.45 network voxels)
    trg, src = _blobs(fine), _blobs(fine, shift)
    zero = torch.zeros(1, 1, *shape)
    settings = RefineSettings(300, 0.01, "params", inputs="images", samples=4000, levels=2)
    theta = refine(model, zero, zero, settings, progress=False, images=(src, trg))
    got = theta[0, :, 3] * (torch.tensor(fine, dtype=torch.float32) - 1) / 2
    np.testing.assert_allclose(got.numpy(), shift, atol=0.15)


def test_istn_test_and_register_refine_on_finer_images(tmp_path):
    """``refine_resolution`` 2 through the test path (evaluate) and the register path."""
    import SimpleITK as sitk

    from istn.data import load_pair_lists
    from istn.engine.evaluate import evaluate
    from istn.engine.register import read_inputs, register_inputs

    shape = [36, 36, 36]
    over = {"size": shape, "spacing": [2.0] * 3, "refine": 30, "refine_mode": "params",
            "refine_inputs": "images", "refine_samples": 2000, "refine_levels": 2,
            "refine_resolution": 2, "refine_learning_rate": 0.01}
    cfg = load_config(None, over)
    torch.manual_seed(0)
    model = Model.build(cfg, "u", "affine")
    model.train(False)

    def image(shift):
        img = sitk.GetImageFromArray(_blobs([48, 48, 48], shift)[0, 0].numpy())
        img.SetSpacing([1.5] * 3)
        return img

    src, trg = image((3.0, 0.0, 0.0)), image((0.0, 0.0, 0.0))
    ps = load_pair_lists(cfg, [(src, trg)])
    res = evaluate(model, ps, torch.device("cpu"), RefineSettings.from_config(cfg),
                   progress=False)
    assert res.after_refinement is not None
    reg = register_inputs(model, [read_inputs((src, trg), (None, None), (None, None), None)],
                          torch.device("cpu"), 30, progress=False)[0]
    # the source holds the pattern 3 voxels (4.5 mm) further along x: target x -> x + 4.5
    moved = np.array(reg.transform.TransformPoint((30.0, 36.0, 36.0)))
    np.testing.assert_allclose(moved, (34.5, 36.0, 36.0), atol=0.5)

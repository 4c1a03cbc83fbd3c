"""The network grid in physical space: world orientation, centre-of-mass placement.

One physical scene (asymmetric Gaussian blobs) is stored axially, with permuted
axes, with flipped axes and on an oblique grid; with ``grid_orientation: world``
the networks must see the same input whatever the storage, and with ``image``
(the behaviour before the key) they do not.
"""

import os
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from istn.config import from_dict, load_config
from istn.data import Geometry, load_pair_lists
from istn.engine.evaluate import true_source_to_target
from istn.engine.model import Model
from istn.export import physical_point_map
from istn.preprocess import centre_of_mass, resample

SCENE = np.array([-10.0, 20.0, 5.0])  # physical centre of the scene (mm)
# Blob offsets from SCENE (mm), widths and heights: no symmetry about any axis.
BLOBS = [((5.0, -3.0, 2.0), 3.0, 100.0), ((-6.0, 4.0, -1.0), 2.5, 70.0),
         ((1.0, 6.0, 5.0), 3.5, 50.0), ((-2.0, -5.0, -4.0), 2.0, 80.0)]
AXIAL_SIZE, AXIAL_SPACING = (28, 32, 24), (1.0, 1.2, 1.5)  # (x, y, z)


def scene(points: np.ndarray, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """The scene's intensity at physical points [N, 3] (moved by ``shift``)."""
    out = np.zeros(len(points))
    for offset, sigma, height in BLOBS:
        d2 = ((points - SCENE - np.asarray(offset) - shift) ** 2).sum(axis=1)
        out += height * np.exp(-d2 / (2 * sigma**2))
    return out


def rotation(axis, deg: float) -> np.ndarray:
    """Rodrigues' formula."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = np.deg2rad(deg)
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


def render(size, spacing, direction=None, centre=SCENE, shift=(0.0, 0.0, 0.0)) -> sitk.Image:
    """The scene sampled at the voxel centres of a grid centred on ``centre``."""
    direction = np.eye(3) if direction is None else direction
    size, spacing = np.asarray(size), np.asarray(spacing, float)
    origin = centre - direction @ ((size - 1) / 2 * spacing)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"))
    idx = idx.reshape(3, -1)[::-1].T.astype(float)  # (x, y, z) columns, array order
    pts = origin + (idx * spacing) @ direction.T
    img = sitk.GetImageFromArray(scene(pts, shift).reshape(size[::-1]).astype(np.float32))
    img.SetSpacing(spacing.tolist())
    img.SetOrigin(origin.tolist())
    img.SetDirection(direction.ravel().tolist())
    return img


def restore(img: sitk.Image, perm=(0, 1, 2), flips=()) -> sitk.Image:
    """The same voxels stored differently: new index axis k is old axis ``perm[k]``,
    then the new axes in ``flips`` run backwards. Direction, spacing and origin follow,
    so every voxel keeps its physical position (checked in the test below)."""
    arr = sitk.GetArrayFromImage(img)
    d = np.array(img.GetDirection()).reshape(3, 3)
    spacing, size = np.array(img.GetSpacing()), np.array(img.GetSize())
    # numpy axes are index axes reversed: new numpy axis (2 - k) is old numpy axis 2 - perm[k]
    arr = np.transpose(arr, [2 - perm[k] for k in (2, 1, 0)])
    d, spacing, size = d[:, list(perm)], spacing[list(perm)], size[list(perm)]
    origin = np.array(img.GetOrigin())
    for k in flips:
        origin = origin + d[:, k] * spacing[k] * (size[k] - 1)
        d[:, k] = -d[:, k]
        arr = np.flip(arr, axis=2 - k)
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    out.SetSpacing(spacing.tolist())
    out.SetOrigin(origin.tolist())
    out.SetDirection(d.ravel().tolist())
    return out


def axial() -> sitk.Image:
    return render(AXIAL_SIZE, AXIAL_SPACING)


def oblique() -> sitk.Image:
    """The scene on a rotated, isotropic, larger grid (its own sampling of the scene)."""
    return render((40, 40, 40), (1.1, 1.1, 1.1), rotation([1.0, 2.0, 0.5], 35.0))


STORAGES = {
    "permuted": lambda: restore(axial(), (2, 0, 1)),
    "flipped": lambda: restore(axial(), flips=(1,)),
    "ras_like": lambda: restore(axial(), flips=(0, 1)),  # x and y reversed, as RAS files
    "sagittal_flipped": lambda: restore(axial(), (1, 2, 0), flips=(0, 2)),
}


def grid_points(img: sitk.Image) -> np.ndarray:
    g = Geometry.of(img)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in g.size[::-1]], indexing="ij"))
    return g.to_physical(idx.reshape(len(g.size), -1)[::-1].T.astype(float))


@pytest.mark.parametrize("name", sorted(STORAGES))
def test_restored_files_hold_the_same_physical_content(name):
    """Checks the helper itself with SimpleITK: nearest-neighbour resampling of the
    re-stored file onto the axial grid gives back the axial voxels exactly."""
    ref, img = axial(), STORAGES[name]()
    assert img.GetSize() != ref.GetSize() or img.GetDirection() != ref.GetDirection()
    back = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(ref))


@pytest.mark.parametrize("name", sorted(STORAGES))
def test_world_grid_same_input_for_permuted_and_flipped_files(name):
    ref, img = axial(), STORAGES[name]()
    # The network grid is the axial voxel grid: every sample lands on a voxel centre.
    a = sitk.GetArrayFromImage(resample(ref, AXIAL_SPACING, AXIAL_SIZE))
    b = sitk.GetArrayFromImage(resample(img, AXIAL_SPACING, AXIAL_SIZE))
    np.testing.assert_array_equal(a, b)
    # Another grid (voxels between the file's): trilinear interpolation commutes with
    # permutations and flips of the axes, so only rounding differs.
    a = sitk.GetArrayFromImage(resample(ref, [1.3] * 3, [20, 24, 16]))
    b = sitk.GetArrayFromImage(resample(img, [1.3] * 3, [20, 24, 16]))
    assert np.abs(a - b).max() < 1e-4 * a.max()
    g = Geometry.of(resample(img, [1.3] * 3, [20, 24, 16]))
    np.testing.assert_array_equal(g.direction, np.eye(3))


def test_world_grid_same_input_for_an_oblique_file():
    spacing, size = [1.25] * 3, [20, 20, 20]
    a = sitk.GetArrayFromImage(resample(axial(), spacing, size))
    out = resample(oblique(), spacing, size)
    b = sitk.GetArrayFromImage(out)
    truth = scene(grid_points(out)).reshape(b.shape)
    # Both are linear interpolations of their own samples of the scene (a 2 mm wide
    # blob on 1.5 mm voxels: a few percent), far below the storage-order effect (> 30%).
    assert np.abs(b - truth).max() < 0.1 * truth.max()
    assert np.abs(a - b).max() < 0.05 * truth.max()
    np.testing.assert_allclose(Geometry.of(out).to_physical(np.array([[9.5] * 3]))[0], SCENE,
                               atol=1e-9)


@pytest.mark.parametrize("name", [*sorted(STORAGES), "oblique"])
def test_image_orientation_keeps_the_storage_order(name):
    """The old behaviour (checkpoints without grid_orientation): inputs differ."""
    img = oblique() if name == "oblique" else STORAGES[name]()
    spacing, size = [1.25] * 3, [20, 20, 20]
    a = sitk.GetArrayFromImage(resample(axial(), spacing, size, orientation="image"))
    out = resample(img, spacing, size, orientation="image")
    np.testing.assert_allclose(out.GetDirection(), img.GetDirection())
    assert np.abs(a - sitk.GetArrayFromImage(out)).max() > 0.3 * a.max()


def test_two_d_identity_direction_is_unchanged():
    """2D identity-direction images (the paper's PNGs): both orientations agree bitwise."""
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((30, 44)).astype(np.float32))
    img.SetOrigin((3.0, -2.0))
    assert resample(img, [1, 1], [44, 30]) is img
    for spacing, size in (([1.0, 1.0], [48, 36]), ([0.7, 1.3], [40, 40])):
        a = resample(img, spacing, size, orientation="world")
        b = resample(img, spacing, size, orientation="image")
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()


# ------------------------------------------------------------------ through load_pair_lists


def _write(img: sitk.Image, path, labels: bool = False):
    if labels:
        lab = sitk.GetImageFromArray((sitk.GetArrayFromImage(img) > 30).astype(np.uint8))
        lab.CopyInformation(img)
        img = lab
    sitk.WriteImage(img, str(path))
    return path


CFG = {"size": [36, 36, 36], "spacing": [1.0, 1.0, 1.0]}


@pytest.mark.parametrize("orientation", ["world", "image"])
def test_pairs_of_differently_stored_files(tmp_path, orientation):
    """A pair (axial source, re-stored target of the same scene) loads as two equal
    inputs (and segmentations) with a world grid, and as different ones with 'image'."""
    cfg = from_dict({**CFG, "grid_orientation": orientation})
    src, trg = axial(), STORAGES["sagittal_flipped"]()
    paths = [_write(im, tmp_path / f"{k}.nii.gz") for k, im in (("s", src), ("t", trg))]
    segs = [_write(im, tmp_path / f"{k}_seg.nii.gz", True) for k, im in (("s", src), ("t", trg))]
    ps = load_pair_lists(cfg, [tuple(paths)], [tuple(segs)])
    diff = (ps.src - ps.trg).abs().max().item()
    seg_diff = (ps.src_seg - ps.trg_seg).abs().max().item()
    if orientation == "world":
        assert diff < 1e-4 * ps.src.max().item() and seg_diff < 1e-6
        np.testing.assert_allclose(ps.src_grid[0].direction, np.eye(3))
    else:
        assert diff > 0.3 * ps.src.max().item() and seg_diff > 0.5
        np.testing.assert_allclose(ps.trg_grid[0].direction.ravel(), trg.GetDirection())


# ------------------------------------------------------------------ grid_centre: mass


def _grid_centre(g: Geometry) -> np.ndarray:
    return g.to_physical(((np.asarray(g.size) - 1) / 2.0)[None])[0]


@pytest.mark.parametrize("storage", ["axial", "oblique"])
def test_centre_of_mass_matches_simpleitk_moments(storage):
    img = axial() if storage == "axial" else oblique()
    other = render((30, 30, 30), (1.2, 1.2, 1.2), shift=(7.0, -4.0, 3.0))
    init = sitk.CenteredTransformInitializer(
        img, other, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS)
    init = sitk.Euler3DTransform(init)
    np.testing.assert_allclose(centre_of_mass(img), init.GetCenter(), atol=1e-6)
    np.testing.assert_allclose(centre_of_mass(other) - centre_of_mass(img),
                               init.GetTranslation(), atol=1e-6)
    # ... and the grid is centred there
    out = resample(img, [1.5] * 3, [16, 16, 16], centre=centre_of_mass(img))
    np.testing.assert_allclose(_grid_centre(Geometry.of(out)), init.GetCenter(), atol=1e-6)


def test_centre_of_mass_inside_a_mask_and_of_a_blank_image():
    img = oblique()
    mask = np.zeros(img.GetSize()[::-1], np.uint8)
    mask[5:25, 10:30, 3:20] = 1
    w = sitk.GetArrayFromImage(img).astype(np.float64) * mask
    idx = [float((w.sum(axis=tuple(a for a in range(3) if a != k)) * np.arange(w.shape[k])).sum()
                 / w.sum()) for k in range(3)][::-1]  # (x, y, z)
    np.testing.assert_allclose(centre_of_mass(img, mask),
                               img.TransformContinuousIndexToPhysicalPoint(idx), atol=1e-9)
    blank = sitk.Image(img.GetSize(), sitk.sitkFloat32)
    blank.CopyInformation(img)
    np.testing.assert_allclose(centre_of_mass(blank), SCENE, atol=1e-9)


def test_identity_prediction_maps_target_centre_of_mass_to_the_source(tmp_path):
    """grid_centre 'mass': each image's grid sits on its centre of mass, so the identity
    is the translation between them, in the exported physical transform too; the
    segmentation lies on its image's grid (not centred on its own mass)."""
    cfg = load_config(None, {**CFG, "grid_centre": "mass"})
    shift = np.array([6.0, -4.0, 3.0])
    src = render((40, 36, 32), (1.1, 1.0, 1.3), shift=shift)
    trg = STORAGES["sagittal_flipped"]()
    paths = [_write(im, tmp_path / f"{k}.nii.gz") for k, im in (("s", src), ("t", trg))]
    segs = [_write(im, tmp_path / f"{k}_seg.nii.gz", True) for k, im in (("s", src), ("t", trg))]
    ps = load_pair_lists(cfg, [tuple(paths)], [tuple(segs)])
    # of the files as read back (NIfTI keeps the geometry in single precision)
    com_s, com_t = (centre_of_mass(sitk.ReadImage(str(p))) for p in paths)
    np.testing.assert_allclose(com_s - com_t, shift, atol=0.05)  # the scene moved by shift
    np.testing.assert_allclose(_grid_centre(ps.src_grid[0]), com_s, atol=1e-9)
    np.testing.assert_allclose(_grid_centre(ps.trg_grid[0]), com_t, atol=1e-9)
    # Same content, each on its own centred grid: the inputs agree (up to interpolation).
    assert (ps.src - ps.trg).abs().max().item() < 0.05 * ps.src.max().item()
    assert (ps.src_seg - ps.trg_seg).abs().mean().item() < 0.02
    model = Model.build(cfg, "u", "affine")
    point_map = physical_point_map(model, torch.eye(3, 4), ps.src_grid[0], ps.trg_grid[0])
    pts = np.array([com_t, com_t + [3.0, -2.0, 1.0], SCENE])
    np.testing.assert_allclose(point_map(pts), pts + (com_s - com_t), atol=1e-9)


def _age(*paths):
    t = time.time() - 100.0
    for p in paths:
        os.utime(p, (t, t))


def test_cached_segmentation_follows_its_image_grid(tmp_path):
    """A segmentation's cache entry is keyed on its image's grid: changing grid_centre
    must not serve a segmentation resampled for the old grid."""
    src, trg = axial(), render((36, 36, 36), (1.0, 1.0, 1.0), shift=(4.0, 0.0, 0.0))
    paths = [_write(im, tmp_path / f"{k}.nii.gz") for k, im in (("s", src), ("t", trg))]
    segs = [_write(im, tmp_path / f"{k}_seg.nii.gz", True) for k, im in (("s", src), ("t", trg))]
    _age(*paths, *segs)
    sets = {}
    for centre in ("image", "mass", "image", "mass"):  # the second round from the cache
        ps = load_pair_lists(from_dict({**CFG, "grid_centre": centre}), [tuple(paths)],
                             [tuple(segs)])
        if centre in sets:
            torch.testing.assert_close(ps.trg_seg, sets[centre].trg_seg, rtol=0, atol=0)
            torch.testing.assert_close(ps.trg, sets[centre].trg, rtol=0, atol=0)
        sets[centre] = ps
    assert (sets["image"].trg_seg - sets["mass"].trg_seg).abs().max().item() > 0.5


# ------------------------------------------------------------------ ground truth


def _write_matrix(m: np.ndarray, path):
    path.write_text("\n".join(" ".join(f"{v:.17g}" for v in row) for row in m) + "\n")
    return path


def test_true_source_to_target_with_oblique_and_permuted_files(tmp_path):
    """Ground-truth transforms (file index -> template index) stay right when the files
    are oblique or permuted and the grids world-aligned: a template point found in each
    file with SimpleITK's own index <-> physical maps lands where the helper says."""
    src, trg = oblique(), STORAGES["permuted"]()
    paths = [_write(im, tmp_path / f"{k}.nii.gz") for k, im in (("s", src), ("t", trg))]
    # A template index space: index q <-> file index by an affine map of our choice.
    t_s = np.eye(4)
    t_s[:3, :3] = rotation([0.0, 1.0, 1.0], 20.0) * 1.1
    t_s[:3, 3] = [3.0, -2.0, 5.0]
    t_t = np.eye(4)
    t_t[:3, :3] = np.diag([0.9, 1.0, 1.2])[[1, 2, 0]]
    t_t[:3, 3] = [-4.0, 1.0, 2.0]
    mats = [_write_matrix(m, tmp_path / f"{k}.txt") for k, m in (("s", t_s), ("t", t_t))]
    ps = load_pair_lists(from_dict(CFG), [tuple(paths)], transforms=[tuple(mats)])
    template = np.array([[10.0, 12.0, 8.0], [14.0, 9.0, 11.0], [7.0, 15.0, 13.0]])
    expected, src_idx = [], []
    for q in template:
        i_s = np.linalg.solve(t_s, [*q, 1.0])[:3]
        i_t = np.linalg.solve(t_t, [*q, 1.0])[:3]
        p_s = src.TransformContinuousIndexToPhysicalPoint(i_s.tolist())
        p_t = trg.TransformContinuousIndexToPhysicalPoint(i_t.tolist())
        src_idx.append(ps.src_grid[0].to_index(np.array([p_s]))[0])
        expected.append(ps.trg_grid[0].to_index(np.array([p_t]))[0])
    np.testing.assert_allclose(true_source_to_target(ps, 0, np.array(src_idx)),
                               np.array(expected), atol=1e-9)


# ------------------------------------------------------------------ more of grid_centre


def test_mass_centre_inside_the_mask_and_segmentation_on_the_image_grid(tmp_path):
    """With a mask, the grid centre is the centre of mass inside it; a segmentation
    whose own mass lies elsewhere is still resampled onto its image's grid."""
    img = oblique()
    path = _write(img, tmp_path / "i.nii.gz")
    mask_arr = np.zeros(img.GetSize()[::-1], np.uint8)
    mask_arr[5:25, 10:30, 3:20] = 1
    mask = sitk.GetImageFromArray(mask_arr)
    mask.CopyInformation(img)
    mask_path = _write(mask, tmp_path / "m.nii.gz")
    seg = sitk.GetImageFromArray((mask_arr * (sitk.GetArrayFromImage(img) > 20)).astype(np.uint8))
    seg.CopyInformation(img)
    seg_path = _write(seg, tmp_path / "s.nii.gz")
    cfg = from_dict({**CFG, "grid_centre": "mass"})
    ps = load_pair_lists(cfg, [(path, path)], [(seg_path, seg_path)],
                         masks=[(mask_path, None)])
    read = sitk.ReadImage(str(path))
    np.testing.assert_allclose(_grid_centre(ps.src_grid[0]), centre_of_mass(read, mask_arr),
                               atol=1e-9)
    np.testing.assert_allclose(_grid_centre(ps.trg_grid[0]), centre_of_mass(read), atol=1e-9)
    assert np.linalg.norm(centre_of_mass(read, mask_arr) - centre_of_mass(read)) > 2.0
    for grid, tensor in ((ps.src_grid[0], ps.src_seg[0, 0]), (ps.trg_grid[0], ps.trg_seg[0, 0])):
        ref = sitk.Image([int(n) for n in grid.size], sitk.sitkFloat32)
        ref.SetOrigin(grid.origin.tolist())
        ref.SetSpacing(grid.spacing.tolist())
        ref.SetDirection(grid.direction.ravel().tolist())
        want = sitk.Resample(sitk.Cast(sitk.ReadImage(str(seg_path)), sitk.sitkFloat32), ref)
        np.testing.assert_allclose(tensor.numpy(), sitk.GetArrayFromImage(want), atol=1e-6)


# ------------------------------------------------------------------ export and checkpoints


@pytest.mark.parametrize("transformation, centre",
                         [("affine", "image"), ("affine", "mass"), ("bspline", "mass")])
def test_export_exact_for_permuted_oblique_target(tmp_path, transformation, centre):
    """``sitk.Resample(source, target, exported)`` reproduces istn's warped source when
    the target is oblique and stored with permuted, flipped axes (world grids, and the
    centre-of-mass translation folded into the exported transform)."""
    from istn.engine.register import register_pairs
    from istn.export import read_transform

    src = render((40, 38, 36), (1.1, 1.2, 1.0), rotation([0.3, -1.0, 0.4], -25.0),
                 shift=(3.0, -2.0, 4.0))
    trg = restore(oblique(), (1, 2, 0), flips=(0,))
    paths = [_write(im, tmp_path / f"{k}.nii.gz") for k, im in (("s", src), ("t", trg))]
    cfg = load_config(None, {**CFG, "spacing": [1.2] * 3, "grid_centre": centre})
    torch.manual_seed(0)
    model = Model.build(cfg, "u", transformation)
    if transformation == "affine":  # a clearly non-identity prediction
        with torch.no_grad():
            model.stn.head.translation.bias.fill_(0.3)
            model.stn.head.rotation.bias.fill_(0.2)
            model.stn.head.scaling.bias.fill_(0.3)
    out = tmp_path / "out"
    register_pairs(model, [tuple(paths)], [out], torch.device("cpu"), 0, progress=False)
    name = "transform.tfm" if transformation == "affine" else "displacement.nii.gz"
    tx = read_transform(out / name)
    src_r, trg_r = (sitk.ReadImage(str(p)) for p in paths)
    ref = sitk.GetArrayFromImage(sitk.Resample(src_r, trg_r, tx, sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_source.nii.gz")))
    # Compare where both interpolate: ITK treats points up to half a voxel outside the
    # source as inside (edge value) while grid_sample blends with its zero padding.
    field = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, trg_r.GetSize(),
                                              trg_r.GetOrigin(), trg_r.GetSpacing(),
                                              trg_r.GetDirection())
    mapped = grid_points(trg_r) + sitk.GetArrayFromImage(field).reshape(-1, 3)
    idx = Geometry.of(src_r).to_index(mapped)
    inside = np.all((idx >= 0) & (idx <= np.array(src_r.GetSize()) - 1), axis=1)
    inside = inside.reshape(ref.shape)
    assert inside.mean() > 0.3 and (ref[inside] > 10).mean() > 0.02
    assert np.abs(ours - ref)[inside].max() < 1e-4 * ref.max()
    identity = sitk.GetArrayFromImage(sitk.Resample(src_r, trg_r))
    assert np.abs(identity - ref).max() > 0.2 * ref.max()  # not the identity


def test_checkpoints_without_the_keys_keep_the_image_grid(tmp_path):
    """Models saved before grid_orientation existed were trained on image grids."""
    from istn.engine.checkpoint import load_model, save_checkpoint
    from istn.errors import IstnError

    cfg = from_dict(CFG)
    model = Model.build(cfg, "u", "affine")
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(model, path)
    state = torch.load(path, weights_only=True)
    for key in ("grid_orientation", "grid_centre"):
        del state["meta"]["config"][key]
    torch.save(state, path)
    old, _ = load_model(path)
    assert (old.cfg.grid_orientation, old.cfg.grid_centre) == ("image", "image")
    with pytest.raises(IstnError, match="grid_orientation image \\(asked: world\\)"):
        load_model(path, cfg)
    load_model(path, from_dict({**CFG, "grid_orientation": "image"}))
    # a config file without the key gets today's default
    assert from_dict(CFG).grid_orientation == "world"
    save_checkpoint(model, path)
    assert load_model(path)[0].cfg.grid_orientation == "world"


@pytest.mark.parametrize("key, value", [("grid_orientation", "lps"), ("grid_centre", "moments"),
                                        ("grid_orientation", 1)])
def test_bad_grid_keys_name_the_key(key, value):
    from istn.errors import IstnError

    with pytest.raises(IstnError, match=key):
        from_dict({key: value})


def test_legacy_configs_fill_only_missing_keys():
    assert from_dict({}, legacy=True).grid_orientation == "image"
    assert from_dict({"grid_orientation": "world"}, legacy=True).grid_orientation == "world"
    assert from_dict({"grid_centre": "mass"}, legacy=True).grid_centre == "mass"

"""The on-disk cache of preprocessed images (istn.cache, used by istn.data.load_volume)."""

import os
import time
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

import istn.data
from istn import cache
from istn.cache import cache_info, clear_cache
from istn.config import from_dict
from istn.data import Geometry, load_volume
from istn.errors import IstnError

BASE2D = {"size": [48, 48], "spacing": [1.5, 1.5], "normalizer_img": "zero_one"}
CFG2D = from_dict(BASE2D)
CFG3D = from_dict({"size": [36, 36, 36], "spacing": [1.2, 0.9, 1.1],
                   "normalizer_img": "zero_mean_unit_var"})


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A fresh, empty cache folder for this test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("ISTN_CACHE_DIR", str(d))
    monkeypatch.setattr(cache, "_warned", False)
    return d


@pytest.fixture
def resamples(monkeypatch):
    """Counts the calls of the resampler load_volume uses."""
    calls = []
    real = istn.data.resample

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(istn.data, "resample", counting)
    return calls


def _age(*paths, seconds=100.0):
    """Backdate files so that they count as settled (old enough to cache)."""
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))
    return paths[0]


def _png(path, arr):
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(arr, np.uint8)), str(path))
    return _age(path)


def _nii(path, arr):
    img = sitk.GetImageFromArray(np.asarray(arr, np.float32))
    img.SetSpacing((0.8, 1.7, 2.3))
    img.SetOrigin((12.5, -40.0, 3.25))
    c, s = np.cos(0.4), np.sin(0.4)
    img.SetDirection([c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0])
    sitk.WriteImage(img, str(path))
    return _age(path)


def _entries(folder):
    return sorted(folder.glob("*.npz")) if folder.exists() else []


def _assert_same(a, b):
    arr_a, res_a, file_a = a
    arr_b, res_b, file_b = b
    assert arr_a.dtype == arr_b.dtype == np.float32
    np.testing.assert_array_equal(arr_a, arr_b)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(res_a), sitk.GetArrayFromImage(res_b))
    for ga, gb in ((Geometry.of(res_a), Geometry.of(res_b)),
                   (Geometry.of(file_a), Geometry.of(file_b))):
        np.testing.assert_array_equal(ga.origin, gb.origin)
        np.testing.assert_array_equal(ga.spacing, gb.spacing)
        np.testing.assert_array_equal(ga.direction, gb.direction)
        assert ga.size == gb.size


def test_hit_equals_miss_2d_png(tmp_path, folder, resamples):
    path = _png(tmp_path / "a.png", np.random.default_rng(0).integers(0, 255, (60, 50)))
    miss = load_volume(path, CFG2D, "img")
    assert len(_entries(folder)) == 1 and len(resamples) == 1
    hit = load_volume(path, CFG2D, "img")
    assert len(resamples) == 1
    _assert_same(miss, hit)
    assert Geometry.of(hit[2]).size == (50, 60)


def test_hit_equals_miss_3d_nifti_with_mask(tmp_path, folder, resamples):
    rng = np.random.default_rng(1)
    path = _nii(tmp_path / "v.nii.gz", rng.random((10, 12, 14)) * 100)
    mask = _nii(tmp_path / "m.nii.gz", rng.random((10, 12, 14)) > 0.5)
    for m in (None, mask):
        miss = load_volume(path, CFG3D, "img", m)
        hit = load_volume(path, CFG3D, "img", m)
        _assert_same(miss, hit)
    assert len(resamples) == 2  # with and without the mask are different entries
    assert len(_entries(folder)) == 2
    g = Geometry.of(hit[1])
    # The network grid is world-aligned; the file image keeps the file's oblique direction.
    assert g.size == (36, 36, 36) and np.allclose(g.direction, np.eye(3))
    assert not np.allclose(Geometry.of(hit[2]).direction, np.eye(3))


def test_hit_neither_reads_nor_resamples(tmp_path, folder, monkeypatch):
    path = _png(tmp_path / "a.png", np.random.default_rng(2).integers(0, 255, (48, 48)))
    first = load_volume(path, CFG2D, "img")

    def fail(*args, **kwargs):
        raise AssertionError("a cache hit must not read or resample the file")

    monkeypatch.setattr(istn.data, "resample", fail)
    monkeypatch.setattr(istn.data, "read_image", fail)
    _assert_same(first, load_volume(path, CFG2D, "img"))


def test_changed_file_is_a_miss(tmp_path, folder, resamples, monkeypatch):
    rng = np.random.default_rng(3)
    path = _png(tmp_path / "a.png", rng.integers(0, 255, (48, 48)))
    load_volume(path, CFG2D, "img")
    _age(path, seconds=50)  # touched: only the mtime changes
    load_volume(path, CFG2D, "img")
    assert len(resamples) == 2
    new = rng.integers(0, 255, (48, 48))  # same size on disk, new content and mtime
    _png(path, new)
    _age(path, seconds=10)
    arr = load_volume(path, CFG2D, "img")[0]
    assert len(resamples) == 3
    monkeypatch.setenv("ISTN_NO_CACHE", "1")
    np.testing.assert_array_equal(arr, load_volume(path, CFG2D, "img")[0])


@pytest.mark.parametrize("change", [{"size": [52, 52]}, {"spacing": [1.0, 1.5]},
                                    {"normalizer_img": "range_matching"},
                                    {"grid_orientation": "image"}, {"grid_centre": "mass"}])
def test_changed_config_is_a_miss(tmp_path, folder, resamples, change):
    path = _png(tmp_path / "a.png", np.random.default_rng(4).integers(0, 255, (48, 48)))
    load_volume(path, CFG2D, "img")
    other = from_dict({**BASE2D, **change})
    load_volume(path, other, "img")
    assert len(resamples) == 2 and len(_entries(folder)) == 2
    load_volume(path, other, "img")
    assert len(resamples) == 2


def test_kind_is_part_of_the_key(tmp_path, folder, resamples):
    path = _png(tmp_path / "a.png", np.random.default_rng(5).integers(0, 255, (48, 48)))
    img = load_volume(path, CFG2D, "img")[0]
    raw = load_volume(path, CFG2D, "raw")[0]
    assert len(resamples) == 2 and not np.array_equal(img, raw)


@pytest.mark.parametrize("garbage", [b"", b"not a zip file", None])
def test_corrupt_entry_is_ignored_and_replaced(tmp_path, folder, resamples, garbage):
    path = _png(tmp_path / "a.png", np.random.default_rng(6).integers(0, 255, (48, 48)))
    good = load_volume(path, CFG2D, "img")
    (entry,) = _entries(folder)
    data = entry.read_bytes()
    entry.write_bytes(garbage if garbage is not None else data[: len(data) // 2])
    _assert_same(good, load_volume(path, CFG2D, "img"))
    assert len(resamples) == 2
    assert entry.read_bytes() == data  # rewritten whole
    load_volume(path, CFG2D, "img")
    assert len(resamples) == 2


def test_entry_for_another_key_is_ignored(tmp_path, folder, resamples):
    a = _png(tmp_path / "a.png", np.random.default_rng(7).integers(0, 255, (48, 48)))
    b = _png(tmp_path / "b.png", np.random.default_rng(8).integers(0, 255, (48, 48)))
    load_volume(a, CFG2D, "img")
    (entry,) = _entries(folder)
    key_b = cache.volume_key(b, None, "img", "zero_one", CFG2D.size, CFG2D.spacing)
    entry.rename(folder / f"{key_b}.npz")  # a renamed or colliding entry
    load_volume(b, CFG2D, "img")
    assert len(resamples) == 2


def test_no_cache_env_writes_nothing(tmp_path, folder, resamples, monkeypatch):
    monkeypatch.setenv("ISTN_NO_CACHE", "1")
    path = _png(tmp_path / "a.png", np.random.default_rng(9).integers(0, 255, (48, 48)))
    load_volume(path, CFG2D, "img")
    load_volume(path, CFG2D, "img")
    assert len(resamples) == 2 and not folder.exists()


def test_recently_modified_file_is_not_cached(tmp_path, folder):
    path = tmp_path / "a.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((48, 48), 7, np.uint8)), str(path))
    load_volume(path, CFG2D, "raw")  # a rewrite within the same clock tick could go unseen
    assert _entries(folder) == []


@pytest.mark.parametrize("how", ["file", "readonly"])
def test_unwritable_cache_does_not_fail(tmp_path, folder, monkeypatch, how):
    if how == "file":
        folder.write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write into read-only folders")
        folder.mkdir()
        folder.chmod(0o500)
    path = _png(tmp_path / "a.png", np.random.default_rng(10).integers(0, 255, (48, 48)))
    with pytest.warns(RuntimeWarning, match="cannot write the preprocessing cache"):
        a = load_volume(path, CFG2D, "img")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        _assert_same(a, load_volume(path, CFG2D, "img"))
    if how == "readonly":
        folder.chmod(0o700)
        assert list(folder.iterdir()) == []


def test_failed_write_leaves_no_files(tmp_path, folder, monkeypatch):
    path = _png(tmp_path / "a.png", np.random.default_rng(11).integers(0, 255, (48, 48)))

    def full_disk(f, **arrays):
        f.write(b"PK\x03\x04partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.np, "savez", full_disk)
    with pytest.warns(RuntimeWarning, match="No space left"):
        load_volume(path, CFG2D, "img")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("case", ["nan", "dimension", "mask"])
def test_bad_files_fail_every_time_and_are_not_cached(tmp_path, folder, case):
    rng = np.random.default_rng(12)
    mask = None
    if case == "nan":
        arr = rng.random((10, 12, 14))
        arr[1, 2, 3] = np.nan
        path, cfg = _nii(tmp_path / "v.mha", arr), CFG3D
    elif case == "dimension":
        path, cfg = _nii(tmp_path / "v.nii.gz", rng.random((10, 12, 14))), CFG2D
    else:
        path, cfg = _png(tmp_path / "a.png", rng.integers(0, 255, (48, 48))), CFG2D
        mask = _png(tmp_path / "m.png", np.ones((40, 48)))
    for _ in range(2):
        with pytest.raises(IstnError):
            load_volume(path, cfg, "img", mask)
    assert _entries(folder) == []


def test_clear_cache_and_info(tmp_path, folder):
    assert cache_info() == (folder, 0, 0)
    assert clear_cache() == 0  # no folder yet
    for i in range(3):
        path = _png(tmp_path / f"{i}.png", np.random.default_rng(i).integers(0, 255, (48, 48)))
        load_volume(path, CFG2D, "img")
    (folder / f".{'0' * 64}-abc.npz").write_bytes(b"left by a killed run")
    (folder / "notes.txt").write_text("not ours")
    where, entries, size = cache_info()
    assert (where, entries) == (folder, 3) and size > 3 * 48 * 48 * 4
    assert clear_cache() == 4
    assert cache_info() == (folder, 0, 0)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("ISTN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "istn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "istn"


def test_cli_cache_info_and_clear(tmp_path, folder, capsys):
    from istn.cli import main

    load_volume(_png(tmp_path / "a.png", np.random.default_rng(5).integers(0, 255, (48, 48))),
                CFG2D, "img")
    assert main(["cache", "info"]) == 0
    assert "1 entries" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 files" in capsys.readouterr().out
    assert cache_info()[1] == 0

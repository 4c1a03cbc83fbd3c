"""A new transformation model and a new similarity are one class and one line each.

Both are defined in this file only, registered by name, then trained (command line),
refined and exported through the whole pipeline, and the export is checked against
SimpleITK's resampling.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn as nn

from istn.cli import main
from istn.similarity import SIMILARITIES, Similarity, register_similarity
from istn.spatial import TRANSFORMATIONS, Transformation, register_transformation
from istn.spatial.grid import identity_grid


class ToyTranslation(Transformation):
    """A translation only: parameters [B, dim] in normalised units (x, y[, z])."""

    options = {"max_translation": "max_translation"}  # reuses an existing config key

    def __init__(self, shape, max_translation: float = 0.1):
        super().__init__(shape)
        self.bound = max_translation

    def head(self, features: int) -> nn.Module:
        linear = nn.Linear(features, self.dim)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        return nn.Sequential(linear, nn.Tanh(), _Scale(self.bound))

    def grid(self, params):
        return identity_grid(self.shape, params.device, params.dtype) + params[:, None, None]

    def map_points(self, params, points):
        return points + params[:, None]

    def inverse_map_points(self, params, points):
        return points - params[:, None]

    def linear_matrix(self, params):
        eye = torch.eye(self.dim, dtype=params.dtype).expand(len(params), -1, -1)
        return torch.cat([eye, params[..., None]], dim=-1)


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class ToyL1(Similarity):
    """Mean absolute difference per pair."""

    def per_pair(self, warped, target, mask=None):
        return (warped - target).abs().flatten(1).mean(1)


@pytest.fixture
def toys():
    """Register the toy model and similarity for one test, then remove them again."""
    register_transformation("toy-translation")(ToyTranslation)
    register_similarity("toy-l1")(ToyL1)
    yield
    TRANSFORMATIONS.pop("toy-translation")
    SIMILARITIES.pop("toy-l1")


def test_unknown_names_are_refused_with_the_choices():
    from istn.config import from_dict
    from istn.errors import IstnError

    with pytest.raises(IstnError, match="similarity.*mse"):
        from_dict({"similarity": "toy-l1"})
    with pytest.raises(ValueError, match="registered twice"):
        register_transformation("affine")(ToyTranslation)


def test_toy_model_and_similarity_train_refine_and_export(toys, small_synth2d, tmp_path):
    d = small_synth2d
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"size": [48, 48], "batch_size": 4, "similarity": "toy-l1",
                               "refine_mode": "params", "refine_learning_rate": 0.01,
                               "max_translation": 0.3}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--loss", "u", "--transformation",
                 "toy-translation", "--train", str(d / "train.csv"), "--out", str(out),
                 "--epochs", "3", "--quiet"]) == 0
    meta = json.loads((out / "train" / "model" / "model.json").read_text())
    assert meta["transformation"] == "toy-translation"
    assert meta["config"]["similarity"] == "toy-l1"

    assert main(["test", "--model", str(out / "train" / "model"), "--test",
                 str(d / "test.csv"), "--test_seg", str(d / "test.seg.csv"), "--out", str(out),
                 "--refine", "30", "--quiet"]) == 0
    summary = json.loads((out / "test" / "summary.json").read_text())
    assert summary["transformation"] == "toy-translation"
    assert summary["after_refinement"] is not None

    # register a pair whose target is the source shifted by a known translation: the
    # toy model, refined with the toy similarity, recovers it, and SimpleITK reproduces
    # istn's warped source from the exported transform
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    arr = sum(100 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 4.0 ** 2))
              for cx, cy in rng.uniform(14, 34, size=(5, 2)))
    source = sitk.GetImageFromArray(arr.astype(np.float32))
    shift = (2.5, -1.5)  # target(p) = source(p + shift): the target -> source map
    target = sitk.Resample(source, source, sitk.TranslationTransform(2, shift))
    src, trg = tmp_path / "source.nii.gz", tmp_path / "target.nii.gz"
    sitk.WriteImage(source, str(src))
    sitk.WriteImage(target, str(trg))
    reg = tmp_path / "reg"
    assert main(["register", "--model", str(out / "train" / "model"), "--source", str(src),
                 "--target", str(trg), "--out", str(reg), "--refine", "80", "--quiet"]) == 0
    tx = sitk.ReadTransform(str(reg / "transform.tfm"))  # linear: one exact ITK transform
    params = np.array(tx.GetParameters())
    np.testing.assert_allclose(params[:4], [1, 0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(params[4:], shift, atol=0.5)
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(reg / "warped_source.nii.gz")))
    theirs = sitk.GetArrayFromImage(sitk.Resample(source, target, tx))
    np.testing.assert_allclose(ours, theirs, atol=1e-3 * float(np.abs(theirs).max()))

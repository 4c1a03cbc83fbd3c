"""Training robustness: network scaling and restarts after dead ReLU layers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from istn.config import load_config
from istn.data import load_pairs
from istn.engine.checkpoint import load_model, save_checkpoint
from istn.engine.model import Model, scaling_from
from istn.engine.train import (
    COLLAPSE_EPOCH,
    RESTART_SEED_STEP,
    collapse,
    dead_layers,
    reinitialise,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(small_synth2d: Path) -> Path:
    return small_synth2d


def _setup(data: Path, **overrides):
    cfg = load_config(data / "config.json", {"epochs": 2, "batch_size": 4, **overrides})
    return cfg, load_pairs(cfg, data / "train.csv", data / "train.seg.csv")


def test_scaling_statistics_match_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 255, (2, 1, 8, 8)), rng.uniform(0, 255, (3, 1, 8, 8))
    s, t = rng.uniform(0, 9, (2, 1, 8, 8)), rng.uniform(0, 9, (3, 1, 8, 8))
    got = scaling_from(*(torch.tensor(x, dtype=torch.float32) for x in (a, b, s, t)))
    both = np.concatenate([a.ravel(), b.ravel()]).astype(np.float32)
    segs = np.concatenate([s.ravel(), t.ravel()]).astype(np.float32)
    np.testing.assert_allclose(got["image"], [both.mean(), both.std(ddof=1)], rtol=1e-6)
    np.testing.assert_allclose(got["seg"], [segs.mean(), segs.std(ddof=1)], rtol=1e-6)
    const = torch.full((2, 1, 4, 4), 7.0)
    assert scaling_from(const, const, None, None) == {"image": [7.0, 1.0], "seg": [0.0, 1.0]}


def test_scaled_networks_see_standardised_values(data):
    """primes/params with scaling equal the raw networks on standardised values."""
    cfg, ps = _setup(data)
    torch.manual_seed(0)
    model = Model.build(cfg, "i", "affine")
    model.scaling = {"image": [120.0, 80.0], "seg": [30.0, 50.0]}
    src, trg = ps.src[:3], ps.trg[:3]
    s_p, t_p = model.primes(src, trg)
    with torch.no_grad():
        want = model.itn((torch.cat([src, trg]) - 120.0) / 80.0) * 50.0 + 30.0
        torch.testing.assert_close(torch.cat([s_p, t_p]), want)
        want_params = model.stn((torch.cat([s_p, t_p], dim=1) - 30.0) / 50.0)
        torch.testing.assert_close(model.params(s_p, t_p), want_params)
    stn_only = Model.build(cfg, "s", "affine")
    stn_only.scaling = model.scaling
    torch.testing.assert_close(stn_only.stn_input(src, trg),
                               (torch.cat([src, trg], dim=1) - 120.0) / 80.0)


def test_scaling_is_saved_and_used_by_a_loaded_model(data, tmp_path):
    cfg, ps = _setup(data)
    torch.manual_seed(0)
    model = Model.build(cfg, "i", "affine")
    model.scaling = scaling_from(ps.src, ps.trg, ps.src_seg, ps.trg_seg)
    save_checkpoint(model, tmp_path / "m.pt")
    loaded, _ = load_model(tmp_path / "m.pt")
    assert loaded.scaling == model.scaling
    with torch.no_grad():
        torch.testing.assert_close(loaded.params(*loaded.primes(ps.src, ps.trg)),
                                   model.params(*model.primes(ps.src, ps.trg)))


@pytest.mark.parametrize("scaling, expect", [("auto", True), ("none", False)])
def test_training_sets_scaling_from_the_training_pairs(data, tmp_path, scaling, expect):
    cfg, ps = _setup(data, epochs=1, network_scaling=scaling)
    torch.manual_seed(0)
    model = Model.build(cfg, "i", "affine")
    train(model, ps, None, tmp_path, torch.device("cpu"), seed=0, progress=False)
    saved = torch.load(tmp_path / "train" / "model" / "checkpoint.pt", weights_only=True)
    want = scaling_from(ps.src, ps.trg, ps.src_seg, ps.trg_seg) if expect else None
    assert model.scaling == want and saved["meta"]["scaling"] == want
    info = json.loads((tmp_path / "train" / "model" / "model.json").read_text())
    assert info["scaling"] == want


def test_dead_itn_layer_is_detected(data):
    cfg, ps = _setup(data)
    torch.manual_seed(0)
    model = Model.build(cfg, "i", "affine")
    assert dead_layers(model, ps.src, ps.trg) == []
    with torch.no_grad():
        model.itn.u1a.bias.fill_(-1e9)  # every output of the decoder's 2-channel layer < 0
    dead = dead_layers(model, ps.src, ps.trg)
    assert dead[0] == "itn.u1a"
    s_p, _ = model.primes(ps.src, ps.trg)
    assert torch.equal(s_p[0], s_p[1])  # the ITN no longer depends on its input


def test_reinitialise_gives_the_weights_of_a_fresh_build(data):
    cfg, _ = _setup(data)
    torch.manual_seed(3)
    model = Model.build(cfg, "i", "affine")
    reinitialise(model, 11)
    torch.manual_seed(11)
    fresh = Model.build(cfg, "i", "affine")
    for a, b in ((model.itn, fresh.itn), (model.stn, fresh.stn)):
        for (k, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(p, q), k


def test_dead_layer_restarts_training_as_the_next_seed(data, tmp_path, capsys):
    """A dead ITN layer restarts training; the result is the run of seed + 1000."""
    cfg, ps = _setup(data)
    torch.manual_seed(5)
    dead = Model.build(cfg, "i", "affine")
    with torch.no_grad():
        dead.itn.u1a.bias.fill_(-1e9)
    train(dead, ps, None, tmp_path / "a", torch.device("cpu"), seed=5, progress=False)
    assert "restart 1 of 3" in capsys.readouterr().err
    a = torch.load(tmp_path / "a" / "train" / "model" / "checkpoint.pt", weights_only=True)
    records = json.loads(a["extra"]["restarts"])
    assert records[0]["epoch"] == 1 and records[0]["seed"] == 5 + RESTART_SEED_STEP
    assert records[0]["reason"].startswith("layer(s) itn.u1a")
    assert a["extra"]["seed"] == 5 and a["epoch"] == 2
    assert len(json.loads(a["extra"]["history"])) == 2  # the restarted run's epochs only

    torch.manual_seed(5 + RESTART_SEED_STEP)
    fresh = Model.build(cfg, "i", "affine")
    train(fresh, ps, None, tmp_path / "b", torch.device("cpu"), seed=5 + RESTART_SEED_STEP,
          progress=False)
    b = torch.load(tmp_path / "b" / "train" / "model" / "checkpoint.pt", weights_only=True)
    for net in ("itn", "stn"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)


def test_collapse_without_dead_layer_is_found_from_epoch_10(data):
    """An STN whose prediction does not depend on the pair counts from COLLAPSE_EPOCH on."""
    cfg, ps = _setup(data)
    torch.manual_seed(0)
    model = Model.build(cfg, "i", "affine")
    with torch.no_grad():
        model.stn.head.fc[0].weight.zero_()  # constant features: alive ReLUs, one transformation
        model.stn.head.fc[0].bias.fill_(1.0)
        model.stn.head.translation.bias.fill_(0.3)
    assert dead_layers(model, ps.src, ps.trg) == []
    assert collapse(model, ps.src, ps.trg, COLLAPSE_EPOCH - 1) is None
    why = collapse(model, ps.src, ps.trg, COLLAPSE_EPOCH)
    assert why is not None and "same transformation" in why
    torch.manual_seed(0)
    healthy = Model.build(cfg, "i", "affine")
    torch.nn.init.normal_(healthy.stn.head.translation.weight, std=0.5)
    assert collapse(healthy, ps.src, ps.trg, COLLAPSE_EPOCH) is None


def test_no_restart_when_disabled(data, tmp_path, capsys):
    cfg, ps = _setup(data, restarts=0)
    torch.manual_seed(5)
    dead = Model.build(cfg, "i", "affine")
    with torch.no_grad():
        dead.itn.u1a.bias.fill_(-1e9)
    train(dead, ps, None, tmp_path, torch.device("cpu"), seed=5, progress=False)
    assert "restart" not in capsys.readouterr().err
    saved = torch.load(tmp_path / "train" / "model" / "checkpoint.pt", weights_only=True)
    assert json.loads(saved["extra"]["restarts"]) == []
    assert dead_layers(dead, ps.src, ps.trg)[0] == "itn.u1a"  # published: stays dead


def test_resume_continues_the_restarted_attempt(data, tmp_path):
    """A run resumed after a restart ends with the weights of an uninterrupted one."""
    def dead_model(cfg):
        torch.manual_seed(5)
        m = Model.build(cfg, "i", "affine")
        with torch.no_grad():
            m.itn.u1a.bias.fill_(-1e9)
        return m

    cfg3, ps = _setup(data, epochs=3)
    train(dead_model(cfg3), ps, None, tmp_path / "whole", torch.device("cpu"), seed=5,
          progress=False)
    cfg2, _ = _setup(data, epochs=2)
    train(dead_model(cfg2), ps, None, tmp_path / "part", torch.device("cpu"), seed=5,
          progress=False)
    torch.manual_seed(99)  # resuming must not depend on the fresh model's weights
    again = Model.build(cfg3, "i", "affine")
    train(again, ps, None, tmp_path / "part", torch.device("cpu"), seed=5, resume=True,
          progress=False)
    a, b = (torch.load(tmp_path / d / "train" / "model" / "checkpoint.pt", weights_only=True)
            for d in ("whole", "part"))
    assert a["extra"]["attempt"] == b["extra"]["attempt"] == 1
    assert json.loads(b["extra"]["history"])[-1]["seed"] == 5 + RESTART_SEED_STEP
    for net in ("itn", "stn"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert again.scaling == scaling_from(ps.src, ps.trg, ps.src_seg, ps.trg_seg)

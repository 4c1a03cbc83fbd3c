"""Random re-pairing of the training images (config 'train_pairing': 'random')."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from istn.cli import main
from istn.data import PairSet
from istn.engine.train import _Run, random_pairs


def train_args(data, out, *extra: str, epochs: int) -> list[str]:
    return ["train", "--config", str(data / "config.json"), "--train", str(data / "train.csv"),
            "--train_seg", str(data / "train.seg.csv"), "--out", str(out), "--epochs",
            str(epochs), "--batch_size", "4", "--quiet", "--dev", "cpu", "--seed", "3", *extra]


def test_random_pairs_are_reproducible_and_never_pair_an_image_with_itself():
    a, b = random_pairs(7, 500, run_seed=3, epoch=2)
    assert bool((a != b).all()) and int(a.max()) < 7 and int(b.max()) < 7
    assert len(set(zip(a.tolist(), b.tolist(), strict=True))) == 7 * 6  # every ordered pair
    again = random_pairs(7, 500, run_seed=3, epoch=2)
    assert torch.equal(a, again[0]) and torch.equal(b, again[1])
    assert not torch.equal(a, random_pairs(7, 500, run_seed=3, epoch=3)[0])


def test_the_pool_holds_each_distinct_image_once():
    imgs = torch.rand(4, 1, 6, 6)
    segs = (imgs > 0.5).float()
    ps = PairSet(names=list("abcd"), src=imgs, trg=imgs.roll(1, 0), src_seg=segs,
                 trg_seg=segs.roll(1, 0))  # a derangement: every image is source and target
    images, pool_segs = _Run.pool.func(SimpleNamespace(train_set=ps))
    assert torch.equal(images, imgs) and torch.equal(pool_segs, segs)


def test_random_pairing_trains_otherwise_and_resumes_exactly(small_synth2d, tmp_path):
    data = small_synth2d
    cfg = json.loads((data / "config.json").read_text())
    random_cfg = tmp_path / "random.json"
    random_cfg.write_text(json.dumps({**cfg, "train_pairing": "random"}))
    listed, straight, resumed = tmp_path / "l", tmp_path / "s", tmp_path / "r"
    assert main(train_args(data, listed, epochs=2)) == 0
    assert main(train_args(data, straight, "--config", str(random_cfg), epochs=2)) == 0
    assert main(train_args(data, resumed, "--config", str(random_cfg), epochs=1)) == 0
    assert main(train_args(data, resumed, "--config", str(random_cfg), "--resume",
                           epochs=2)) == 0

    def final(out):
        return torch.load(out / "train" / "model" / "checkpoint.pt", weights_only=True)

    a, b = final(resumed), final(straight)
    for net in ("stn", "itn"):
        assert all(torch.equal(v, b[net][k]) for k, v in a[net].items())
    other = final(listed)["stn"]
    assert any(not torch.equal(v, other[k]) for k, v in final(straight)["stn"].items())

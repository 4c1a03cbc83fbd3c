"""Several processes under torchrun: sharding helpers, DDP training, sharded test/register.

The multi-process tests start ``python -m torch.distributed.run`` (torchrun) with the
gloo backend on the CPU and compare with a one-process run on the same data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from istn.engine import distributed
from istn.engine.train import _local_part
from istn.synth import generate


@pytest.mark.parametrize("n,world", [(7, 2), (10, 3), (2, 4), (0, 2), (5, 1)])
def test_shard_then_interleave_is_identity(n, world):
    items = list(range(n))
    parts = [distributed.shard(items, distributed.Dist(r, world)) for r in range(world)]
    assert sorted(x for p in parts for x in p) == items
    assert distributed.interleave(parts) == items


@pytest.mark.parametrize("batch,world", [(10, 2), (7, 3), (2, 3), (1, 2)])
def test_local_parts_average_to_the_batch_mean(batch, world):
    """sum_r weight_r * mean_r / world == mean over the batch (what DDP's average gives)."""
    idx = torch.arange(batch)
    values = torch.rand(batch, dtype=torch.float64)
    parts = [_local_part(idx, distributed.Dist(r, world)) for r in range(world)]
    assert sorted(int(i) for p, w in parts if w > 0 for i in p) == list(range(batch))
    ddp = sum(w * values[p].mean() for p, w in parts) / world
    assert torch.isclose(ddp, values.mean())
    assert all(len(p) >= 1 for p, _ in parts)  # everybody takes part in the exchange


def test_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.from_env() == distributed.SINGLE
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(Exception, match="WORLD_SIZE"):
        distributed.from_env()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    generate(root / "data", dim=2, n_train=14, n_val=2, n_test=3, size=[64, 64], seed=3)
    return root


def _istn(root: Path, *args: str, procs: int = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
               "--standalone"] if procs > 1 else [sys.executable])
    cmd = [*launch, "-m", "istn", *args, "--quiet", "--dev", "cpu"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _train(root: Path, out: str, procs: int) -> None:
    _istn(root, "train", "--config", "data/config.json", "--train", "data/train.csv",
          "--train_seg", "data/train.seg.csv", "--val", "data/val.csv", "--val_seg",
          "data/val.seg.csv", "--epochs", "2", "--batch_size", "4", "--out", out, procs=procs)


@pytest.fixture(scope="module")
def trained(data) -> Path:
    _train(data, "one", 1)
    _train(data, "two", 2)
    return data


def test_ddp_training_matches_one_process(trained):
    """2 processes x 2 epochs (14 pairs, global batch 4: the last batch is split 1+1)."""
    one = torch.load(trained / "one/train/model/checkpoint.pt", weights_only=True)
    two = torch.load(trained / "two/train/model/checkpoint.pt", weights_only=True)
    assert two["epoch"] == one["epoch"] == 2
    for net in ("itn", "stn"):
        for k, w in one[net].items():
            torch.testing.assert_close(two[net][k], w, rtol=1e-3, atol=1e-4, msg=f"{net}.{k}")
    moved = max((one["stn"][k] - torch.load(trained / "one/train/model/checkpoint_epoch0001.pt",
                                            weights_only=True)["stn"][k]).abs().max()
                for k in one["stn"])
    assert moved > 1e-4  # the comparison is not between two untrained models
    h1 = json.loads((trained / "one/train/history.json").read_text())
    h2 = json.loads((trained / "two/train/history.json").read_text())
    for a, b in zip(h1, h2, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_dice"] == pytest.approx(a["val_dice"], abs=1e-3)
    # only rank 0 writes: one TensorBoard file, no stray temporary checkpoints
    assert len(list((trained / "two/tensorboard").iterdir())) == 1
    assert not list((trained / "two/train/model").glob(".*"))


def test_sharded_test_merges_all_pairs(trained):
    args = ["test", "--model", "one/train/model", "--test", "data/test.csv", "--test_seg",
            "data/test.seg.csv", "--test_points", "data/test.points.csv", "--refine", "3"]
    _istn(trained, *args, "--out", "t1")
    _istn(trained, *args, "--out", "t2", procs=2)
    a = (trained / "t1/test/metrics.csv").read_text().splitlines()
    b = (trained / "t2/test/metrics.csv").read_text().splitlines()
    assert len(a) == 1 + 3 * 3 and a[0] == b[0]
    for ra, rb in zip(a[1:], b[1:], strict=True):
        na, nb = ra.split(","), rb.split(",")
        assert na[:2] == nb[:2]  # same pair order, same stage
        assert [float(x) for x in nb[2:] if x] == pytest.approx(
            [float(x) for x in na[2:] if x], rel=1e-5, abs=1e-6)
    summary = json.loads((trained / "t2/test/summary.json").read_text())
    assert summary["pairs"] == 3 and summary["processes"] == 2
    names = sorted(p.name for p in (trained / "t2/test").glob("*_warped_src_refined.nii.gz"))
    assert len(names) == 3  # each process wrote its own pairs' images


def test_sharded_register_with_more_processes_than_pairs(trained):
    rows = ["src,trg"] + (trained / "data/test.csv").read_text().splitlines()[1:3]
    (trained / "data/two_pairs.csv").write_text("\n".join(rows) + "\n")
    args = ["register", "--model", "one/train/model", "--pairs", "data/two_pairs.csv",
            "--refine", "2"]
    _istn(trained, *args, "--out", "r1")
    _istn(trained, *args, "--out", "r3", procs=3)  # rank 2 has nothing to register
    a = (trained / "r1/metrics.csv").read_text().splitlines()
    b = (trained / "r3/metrics.csv").read_text().splitlines()
    assert len(a) == len(b) == 3
    assert [r.split(",")[0] for r in a] == [r.split(",")[0] for r in b]
    assert sorted(p.name for p in (trained / "r3").iterdir() if p.is_dir()) == \
        sorted(p.name for p in (trained / "r1").iterdir() if p.is_dir())

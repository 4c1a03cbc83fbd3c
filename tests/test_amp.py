"""``--amp``: bf16 autocast for the networks gives the same Dice within 0.01.

Runs on the CPU here (autocast works there too); on a GPU the same path is the fast
one. Both runs train, test and refine on the same small synthetic 2D data.
"""

import json

import pytest
import torch

from istn.cli import main, main_reg
from istn.config import from_dict
from istn.engine.model import Model

pytestmark = pytest.mark.slow


def test_autocast_keeps_float32_outputs():
    model = Model.build(from_dict({"size": [64, 64]}), "i", "affine")
    model.amp = True
    x = torch.rand(2, 1, 64, 64) * 255
    s_p, t_p = model.primes(x, x.flip(-1))
    params = model.params(s_p, t_p)
    assert s_p.dtype == t_p.dtype == params.dtype == torch.float32
    model.amp = False
    ref = model.params(*model.primes(x, x.flip(-1)))
    # bf16 keeps about 3 significant digits; the zero-initialised heads give the identity
    torch.testing.assert_close(params, ref, atol=2e-2, rtol=2e-2)


def test_amp_gives_the_same_dice(tmp_path):
    data = tmp_path / "data"
    assert main(["synth", "2d", "--out", str(data), "--pairs", "20", "--val", "2", "--test",
                 "4", "--size", "64", "64", "--seed", "5"]) == 0
    s = lambda name: str(data / name)  # noqa: E731
    dice = {}
    for amp in (False, True):
        out = tmp_path / f"amp{int(amp)}"
        args = ["--config", s("config.json"), "--train", s("train.csv"), "--train_seg",
                s("train.seg.csv"), "--test", s("test.csv"), "--test_seg", s("test.seg.csv"),
                "--epochs", "30", "--batch_size", "5", "--refine", "10", "--out", str(out),
                "--quiet", "--dev", "cpu", "--seed", "1"] + (["--amp"] if amp else [])
        assert main_reg(args) == 0
        summary = json.loads((out / "test" / "summary.json").read_text())
        dice[amp] = summary["after_refinement"]["dice"]
        history = json.loads((out / "train" / "history.json").read_text())
        assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]  # it learnt
    print("Dice after refinement, fp32 / bf16 autocast:", dice[False], dice[True])
    assert dice[True] == pytest.approx(dice[False], abs=0.01)

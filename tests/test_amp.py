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
    """Same trained model, tested (prediction + refinement) in float32 and under --amp.

    Comparing two *trainings* would mostly measure chaos: on small data a change of
    summation order alone moves the Dice of a few-epoch model by more than 0.01.
    """
    data = tmp_path / "data"
    assert main(["synth", "2d", "--out", str(data), "--pairs", "20", "--val", "2", "--test",
                 "6", "--size", "64", "64", "--seed", "5"]) == 0
    s = lambda name: str(data / name)  # noqa: E731
    base = ["--config", s("config.json"), "--quiet", "--dev", "cpu", "--seed", "1"]
    out = tmp_path / "train"
    assert main_reg([*base, "--train", s("train.csv"), "--train_seg", s("train.seg.csv"),
                     "--epochs", "30", "--batch_size", "5", "--out", str(out), "--amp"]) == 0
    history = json.loads((out / "train" / "history.json").read_text())
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]  # it learnt under amp
    dice = {}
    for amp in (False, True):
        test_out = tmp_path / f"test{int(amp)}"
        assert main(["test", "--model", str(out / "train" / "model"), "--test", s("test.csv"),
                     "--test_seg", s("test.seg.csv"), "--refine", "20", "--out",
                     str(test_out), "--quiet", "--dev", "cpu"] + (["--amp"] if amp else [])) == 0
        summary = json.loads((test_out / "test" / "summary.json").read_text())
        dice[amp] = (summary["before_refinement"]["dice"], summary["after_refinement"]["dice"])
    print("Dice before/after refinement, fp32:", dice[False], "bf16 autocast:", dice[True])
    assert dice[True] == pytest.approx(dice[False], abs=0.01)

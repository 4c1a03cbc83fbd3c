"""Smoke test of the benchmark (``python -m istn.bench --quick``): keys and values, no timings."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

CONFIG_KEYS = ("train_s_per_epoch", "train_pairs_per_s", "predict_ms_per_pair",
               "refine_s_per_pair_sequential", "refine_s_per_pair_batched", "peak_rss_mb")
CLASSICAL_KEYS = ("simpleitk_s_per_pair", "simpleitk_dice", "istn_s_per_pair_predict",
                  "istn_s_per_pair_refined", "istn_dice_predict", "istn_dice_refined")
FLOPS_KEYS = ("train_step_gflop", "achieved_gflops", "peak_gflops")


def _positive(value) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


@pytest.mark.slow
def test_quick_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "istn.bench", "--quick", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vs. the published research code" in proc.stdout
    result = json.loads((out / "bench.json").read_text())

    assert isinstance(result["device"], str) and result["device"]
    for dim in ("2d", "3d"):
        for transformation in ("affine", "bspline"):
            figures = result[dim][transformation]
            for key in CONFIG_KEYS:
                assert _positive(figures[key]), (dim, transformation, key, figures.get(key))
    classical = result["classical"]
    for key in CLASSICAL_KEYS:
        assert _positive(classical[key]), (key, classical.get(key))
        if key.endswith("dice"):
            assert 0.0 <= classical[key] <= 1.0, (key, classical[key])
    for key in FLOPS_KEYS:
        assert _positive(result["flops"][key]), (key, result["flops"].get(key))
    # The temporary data folder is gone; only bench.json was written to --out.
    assert sorted(p.name for p in out.iterdir()) == ["bench.json"]

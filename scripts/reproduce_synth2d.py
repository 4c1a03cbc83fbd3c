"""Reproduce the paper's synthetic 2D experiment on the published data.

Splits the published training pairs into training pairs (the first 80) and
validation pairs (the last 20, never trained on), then runs ``istn-reg`` with the
published config for each strategy (affine) and ISTN-i B-spline, testing with
refinement on the validation pairs. Writes ``OUT/results.md`` / ``results.json``
(a table of Dice, HD, ASD, precision, recall and landmark errors before/after
refinement with seconds per epoch).

    python scripts/reproduce_synth2d.py --data ../shared/data/synth2d --out runs/synth2d

``--folds 5`` instead runs 5-fold cross-validation over all 100 pairs (pairs 1-20,
21-40, ... held out in turn), so every pair is a validation pair once.

``--exact`` adds ``"network_scaling": "none"`` and ``"restarts": 0`` to the published
config: the published code's training, without istn's two robustness defaults.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from istn import layout

RUNS = [("affine", "u"), ("affine", "s"), ("affine", "e"), ("affine", "i"), ("bspline", "i")]
# beyond the paper, run only when named with --runs (e.g. svf_i affine+svf_i)
MORE_RUNS = [("svf", "i"), ("affine+svf", "i"), ("affine+bspline", "i")]
KINDS = ("", ".seg", ".points", ".transforms")
METRICS = ("dice", "hd", "asd", "precision", "recall", "landmark_error", "landmark_error_gt")


def split(data: Path, out: Path, val: slice) -> None:
    """Write train/val CSVs with absolute paths (the published CSVs are relative).

    The pairs in ``val`` are validation pairs, all others training pairs.
    """
    out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        with open(data / f"train{kind}.csv", newline="") as f:
            rows = list(csv.reader(f))[1:]
        rows = [[str((data / p).resolve()) for p in r] for r in rows]
        held = set(range(len(rows))[val])
        parts = (("train", [r for i, r in enumerate(rows) if i not in held]),
                 ("val", [r for i, r in enumerate(rows) if i in held]))
        for name, part in parts:
            with open(out / f"{name}{kind}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["src", "trg"])
                w.writerows(part)


def run(config: Path, splits: Path, out: Path, transformation: str, loss: str,
        extra: list[str]) -> dict:
    run_out = out / f"{transformation}_{loss}"
    summary = layout.test_summary(layout.test_dir(run_out))
    if not summary.exists():
        s = lambda k: str(splits / k)  # noqa: E731
        cmd = [sys.executable, "-c", "import sys; from istn.cli import main_reg; "
               "sys.exit(main_reg())", "--config", str(config),
               "--transformation", transformation, "--loss", loss,
               "--train", s("train.csv"), "--train_seg", s("train.seg.csv"),
               "--val", s("val.csv"), "--val_seg", s("val.seg.csv"),
               "--test", s("val.csv"), "--test_seg", s("val.seg.csv"),
               "--test_points", s("val.points.csv"), "--test_transforms",
               s("val.transforms.csv"), "--out", str(run_out), "--quiet", "--overwrite", *extra]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    result = json.loads(summary.read_text())
    history = json.loads(layout.history(run_out).read_text())
    secs = [h["seconds"] for h in history[1:]] or [history[0]["seconds"]]
    result["seconds_per_epoch"] = sum(secs) / len(secs)
    # the seed of the initialisation that trained (differs from --seed after restarts)
    result["trained_seed"] = history[-1].get("seed")
    return result


def table(results: dict) -> str:
    head = ("| run | stage | " + " | ".join(METRICS) + " | s/epoch | trained seed |\n|"
            + "---|" * (len(METRICS) + 4))
    lines = [head]
    names = {"u": "STN-u", "s": "STN-s", "e": "ISTN-e", "i": "ISTN-i"}
    for key, r in results.items():
        t, loss = key.split("_")
        for stage in ("identity", "before_refinement", "after_refinement"):
            vals = r[stage]
            cells = " | ".join("n/a" if vals[m] is None else f"{vals[m]:.3f}" for m in METRICS)
            lines.append(f"| {names[loss]} {t} | {stage} | {cells} | "
                         f"{r['seconds_per_epoch']:.2f} | {r.get('trained_seed')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/synth2d", help="published synth2d folder")
    p.add_argument("--out", default="runs/synth2d", help="output folder")
    p.add_argument("--n_train", type=int, default=80,
                   help="pairs used for training (the first N); ignored with --folds")
    p.add_argument("--folds", type=int, default=0,
                   help="K-fold cross-validation: K consecutive folds, each validated by a "
                        "model trained on the other pairs; means over all pairs")
    p.add_argument("--runs", nargs="*", default=None,
                   help="subset of runs as TRANSFORMATION_LOSS, e.g. affine_i bspline_i; "
                        "also svf_i, affine+svf_i, affine+bspline_i")
    p.add_argument("--exact", action="store_true",
                   help="train as the published code does: no network scaling, no restarts")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="extra istn-reg flags after --")
    a = p.parse_args()
    data, out = Path(a.data).resolve(), Path(a.out)
    extra = [x for x in a.extra if x != "--"]
    runs = ([(t, loss) for t, loss in RUNS + MORE_RUNS if f"{t}_{loss}" in a.runs] if a.runs
            else RUNS)
    config = data / "config.json"
    if a.exact:
        published = json.loads(config.read_text())
        config = out / "config_exact.json"
        out.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps({**published, "network_scaling": "none", "restarts": 0},
                                     indent=2) + "\n")
    if a.folds > 1:
        cross_validate(data, config, out, runs, a.folds, extra)
        return
    split(data, out / "splits", slice(a.n_train, None))
    results = {}
    for t, loss in runs:
        results[f"{t}_{loss}"] = run(config, out / "splits", out, t, loss, extra)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(table(results))
    print(table(results))


def cross_validate(data: Path, config: Path, out: Path, runs: list, folds: int,
                   extra: list[str]) -> None:
    """K-fold cross-validation; each fold's means are weighted by its number of pairs."""
    with open(data / "train.csv", newline="") as f:
        n = len(list(csv.reader(f))) - 1
    bounds = [round(k * n / folds) for k in range(folds + 1)]
    results, per_fold = {}, {}
    for t, loss in runs:
        key = f"{t}_{loss}"
        fold_results = []
        for k in range(folds):
            fold_out = out / f"fold{k}"
            split(data, fold_out / "splits", slice(bounds[k], bounds[k + 1]))
            fold_results.append(run(config, fold_out / "splits", fold_out, t, loss, extra))
        sizes = [bounds[k + 1] - bounds[k] for k in range(folds)]
        merged = {"seconds_per_epoch": sum(r["seconds_per_epoch"] for r in fold_results) / folds,
                  "trained_seed": "/".join(str(r.get("trained_seed")) for r in fold_results)}
        for stage in ("identity", "before_refinement", "after_refinement"):
            merged[stage] = {m: _weighted([r[stage][m] for r in fold_results], sizes)
                             for m in METRICS}
        results[key] = merged
        per_fold[key] = [{s: r[s] for s in ("identity", "before_refinement",
                                             "after_refinement")} for r in fold_results]
        (out / "results.json").write_text(json.dumps({"folds": folds, "mean": results,
                                                      "per_fold": per_fold}, indent=2))
        (out / "results.md").write_text(table(results))
    print(table(results))


def _weighted(values: list, weights: list[int]) -> float | None:
    if any(v is None for v in values):
        return None
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


if __name__ == "__main__":
    main()

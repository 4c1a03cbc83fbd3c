"""Reproduce the paper's synthetic 2D experiment on the published data.

Splits the published training pairs into training pairs (the first 80) and
validation pairs (the last 20, never trained on), then runs ``istn-reg`` with the
published config for each strategy (affine) and ISTN-i B-spline, testing with
refinement on the validation pairs. Writes ``OUT/results.md`` / ``results.json``
(a table of Dice, HD, ASD, precision, recall and landmark errors before/after
refinement with seconds per epoch).

    python scripts/reproduce_synth2d.py --data ../shared/data/synth2d --out runs/synth2d
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

RUNS = [("affine", "u"), ("affine", "s"), ("affine", "e"), ("affine", "i"), ("bspline", "i")]
KINDS = ("", ".seg", ".points", ".transforms")
METRICS = ("dice", "hd", "asd", "precision", "recall", "landmark_error", "landmark_error_gt")


def split(data: Path, out: Path, n_train: int) -> None:
    """Write train/val CSVs with absolute paths (the published CSVs are relative)."""
    out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        with open(data / f"train{kind}.csv", newline="") as f:
            rows = list(csv.reader(f))[1:]
        rows = [[str((data / p).resolve()) for p in r] for r in rows]
        for name, part in (("train", rows[:n_train]), ("val", rows[n_train:])):
            with open(out / f"{name}{kind}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["src", "trg"])
                w.writerows(part)


def run(data: Path, splits: Path, out: Path, transformation: str, loss: str,
        extra: list[str]) -> dict:
    run_out = out / f"{transformation}_{loss}"
    summary = run_out / "test" / "summary.json"
    if not summary.exists():
        s = lambda k: str(splits / k)  # noqa: E731
        cmd = [sys.executable, "-c", "import sys; from istn.cli import main_reg; "
               "sys.exit(main_reg())", "--config", str(data / "config.json"),
               "--transformation", transformation, "--loss", loss,
               "--train", s("train.csv"), "--train_seg", s("train.seg.csv"),
               "--val", s("val.csv"), "--val_seg", s("val.seg.csv"),
               "--test", s("val.csv"), "--test_seg", s("val.seg.csv"),
               "--test_points", s("val.points.csv"), "--test_transforms",
               s("val.transforms.csv"), "--out", str(run_out), "--quiet", "--overwrite", *extra]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    result = json.loads(summary.read_text())
    history = json.loads((run_out / "train" / "history.json").read_text())
    secs = [h["seconds"] for h in history[1:]] or [history[0]["seconds"]]
    result["seconds_per_epoch"] = sum(secs) / len(secs)
    return result


def table(results: dict) -> str:
    head = ("| run | stage | " + " | ".join(METRICS) + " | s/epoch |\n|"
            + "---|" * (len(METRICS) + 3))
    lines = [head]
    names = {"u": "STN-u", "s": "STN-s", "e": "ISTN-e", "i": "ISTN-i"}
    for key, r in results.items():
        t, loss = key.split("_")
        for stage in ("identity", "before_refinement", "after_refinement"):
            vals = r[stage]
            cells = " | ".join("n/a" if vals[m] is None else f"{vals[m]:.3f}" for m in METRICS)
            lines.append(f"| {names[loss]} {t} | {stage} | {cells} | "
                         f"{r['seconds_per_epoch']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/synth2d", help="published synth2d folder")
    p.add_argument("--out", default="runs/synth2d", help="output folder")
    p.add_argument("--n_train", type=int, default=80, help="pairs used for training")
    p.add_argument("--runs", nargs="*", default=None,
                   help="subset of runs as TRANSFORMATION_LOSS, e.g. affine_i bspline_i")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="extra istn-reg flags after --")
    a = p.parse_args()
    data, out = Path(a.data).resolve(), Path(a.out)
    split(data, out / "splits", a.n_train)
    extra = [x for x in a.extra if x != "--"]
    results = {}
    for t, loss in RUNS:
        if a.runs and f"{t}_{loss}" not in a.runs:
            continue
        results[f"{t}_{loss}"] = run(data, out / "splits", out, t, loss, extra)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()

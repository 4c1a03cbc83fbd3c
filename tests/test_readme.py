"""Every ```bash block of README.md runs as written (issue #14), in README order.

How it runs them (one test per block, in order; later blocks use earlier outputs):

* A scratch folder ``ROOT`` holds ``ROOT/istn``, a copy of this checkout's files (what
  ``git ls-files`` lists, as a user's clone), and ``ROOT/shared``, a link to the
  ``../shared`` beside the checkout (the published data), so the README's relative
  paths (``scripts/...``, ``configs/...``, ``../shared/data/synth2d``) hold. Every
  block runs in ``ROOT/istn`` with ``bash`` and ``set -euo pipefail`` and must exit 0.
* The first block's install lines run in a fresh virtual environment
  (``python -m venv ROOT/venv``, then the line as written: ``pip install torch==2.13.0
  && pip install . && istn demo``); every later block runs with that environment
  activated, as a user who follows the README would (its ``pip install -e ".[test]"``
  and ``".[brain,compare]"`` install there, never into the environment running the tests).
* A command that runs the test suite (``python -m pytest``) is not run again from
  inside it: the rest of its line or block runs, and the block says that this is the
  command CI runs (``.ci/run`` runs the README's test line; see ``readme_blocks.py``).
* A block preceded by ``<!-- not run by CI: REASON -->`` is skipped with that reason
  (listed at the end of the pytest output); nothing else is skipped.
* ``ISTN_EXAMPLE_EPOCHS=1`` and ``ISTN_EXAMPLE_REFINE=2`` cap training epochs and
  refinement iterations (istn warns that they are set), so the examples take minutes.

The README's placeholders for the user's own files are created first in ``ROOT/istn``
(``make_fixtures``): ``train.csv``, ``train.seg.csv``, ``val.csv``, ``val.seg.csv``,
``test.csv``, ``test.seg.csv``, ``test.points.csv``, ``test.transforms.csv`` (8 training,
2 validation and 4 test pairs of istn's synthetic 2D data at 48x48, in
``fixture_data/``), the configs ``config.json``, ``my.json`` and ``c.json`` (that data's
config, batch 4), ``cohort.csv`` (the 4 test pairs with their segmentations, for
``istn register --pairs``), ``other_channel.nii.gz`` (a 2D image) and
``target_points.csv`` (three points ``x,y``). ``OUT`` is an output folder as written.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from readme_blocks import Block, blocks, readme_test_line, runnable

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CAPS = {"ISTN_EXAMPLE_EPOCHS": "1", "ISTN_EXAMPLE_REFINE": "2", "ISTN_EXAMPLE_PAIRS": "2"}
BLOCKS = blocks()
BLOCK_TIMEOUT_S = 900

# Files the README says a block writes, keyed by a string of that block.
EXPECTED = {
    "istn demo": ["istn_demo/test/summary.json", "istn_demo/test/metrics.csv",
                  "istn_demo/test/pairs.png", "istn_demo/test/report.html",
                  "istn_demo/train/loss_curve.png", "istn_demo/tensorboard"],
    "scripts/reproduce_synth2d.py": ["runs/synth2d/results.md", "runs/synth2d/results.json"],
    "--out OUT": ["OUT/train/model/checkpoint.pt", "OUT/test/summary.json",
                  "OUT/test/report.html"],
    "--out runs/mine": ["runs/mine/train/model/checkpoint.pt", "runs/mine/test/summary.json"],
    "--out runs/3d": ["data3d/config.json", "runs/3d/train/model/checkpoint.pt",
                      "runs/3d/test/summary.json"],
    "--out R": ["D/config.json", "R/train/model/checkpoint.pt", "R/test/summary.json"],
    "--out reg/pair1": [f"reg/pair1/{f}" for f in (
        "warped_source.nii.gz", "warped_source_seg.nii.gz", "transform.tfm", "transform.h5",
        "inverse.h5", "metrics.json", "report.png")]
        + ["other_channel_warped.nii.gz", "in_source.csv"],
    "--pairs cohort.csv": ["run/train/model/checkpoint.pt", "run/test/summary.json",
                           "reg/metrics.csv", "reg/report.html"],
    "istn-reg --config c.json": ["run-reg/test/summary.json"],
    "python -m istn.bench --out": ["bench_out/bench.json"],
    "istn.bench_brain": ["brain_data/config.json", "brain_bench/bench_brain.json"],
}


# ----------------------------------------------------------------------------- setup

def copy_checkout(dest: Path) -> None:
    """The checkout's files as a clone has them (tracked and new, not ignored)."""
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached",
                                 "--others", "--exclude-standard"], check=True,
                                capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "runs"))
        return
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def make_fixtures(work: Path) -> None:
    """The files the README's placeholders name (see the module docstring)."""
    import SimpleITK as sitk

    from istn.synth import generate

    data = generate(work / "fixture_data", dim=2, n_train=8, n_val=2, n_test=4,
                    size=[48, 48], seed=1)
    for split in ("train", "val", "test"):
        for kind in ("", ".seg", ".points", ".transforms"):
            name = f"{split}{kind}.csv"
            if not (data / name).is_file():
                continue
            with open(data / name, newline="") as f:
                rows = list(csv.reader(f))
            with open(work / name, "w", newline="") as f:
                csv.writer(f).writerows([rows[0]] + [[f"fixture_data/{p}" for p in r]
                                                     for r in rows[1:]])
    config = {**json.loads((data / "config.json").read_text()), "batch_size": 4}
    for name in ("config.json", "my.json", "c.json"):
        (work / name).write_text(json.dumps(config, indent=2) + "\n")
    with open(work / "test.csv", newline="") as f:
        pairs = list(csv.reader(f))[1:]
    with open(work / "test.seg.csv", newline="") as f:
        segs = list(csv.reader(f))[1:]
    with open(work / "cohort.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["src", "trg", "src_seg", "trg_seg"])
        w.writerows([*p, *s] for p, s in zip(pairs, segs, strict=True))
    image = sitk.ReadImage(str(work / pairs[0][0]), sitk.sitkFloat32)
    sitk.WriteImage(image, str(work / "other_channel.nii.gz"))
    (work / "target_points.csv").write_text("x,y\n40.0,50.5\n64.0,64.0\n90.5,70.0\n")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    if SHARED.is_dir():
        (root / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    work = root / "istn"
    work.mkdir()
    copy_checkout(work)
    make_fixtures(work)
    return {"root": root, "work": work, "venv": root / "venv", "failed": []}


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_block(block: Block, scratch: dict) -> subprocess.CompletedProcess:
    venv, work = scratch["venv"], scratch["work"]
    if block.number == 1:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    script = (f'. "{venv}/bin/activate"\nset -euo pipefail\ncd "{work}"\n'
              + runnable(block.code))
    env = {**os.environ, **CAPS, "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "MPLBACKEND": "Agg"}
    env.pop("PYTHONPATH", None)  # the fresh environment's istn, not this one's
    log = scratch["root"] / f"block{block.number:02d}.log"
    t0, cpu0 = time.perf_counter(), _children_cpu_s()
    with open(log, "w") as f:
        proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, stdout=f,
                              stderr=subprocess.STDOUT, timeout=BLOCK_TIMEOUT_S)
    proc.stdout = log.read_text(errors="replace")
    print(f"README block {block.number} (line {block.line}): exit {proc.returncode} in "
          f"{time.perf_counter() - t0:.0f} s (CPU {_children_cpu_s() - cpu0:.0f} s); log {log}")
    return proc


# ----------------------------------------------------------------------------- tests

def test_every_block_is_run_or_marked():
    """The marker is the only way out, and this README uses it only for what cannot run."""
    assert len(BLOCKS) >= 10
    skipped = [(b.number, b.skip) for b in BLOCKS if b.skip]
    assert all("torchrun --nnodes" in BLOCKS[n - 1].code for n, _ in skipped), skipped
    assert all("--nnodes" not in b.code for b in BLOCKS if not b.skip)


def test_ci_runs_the_readme_test_line():
    line = readme_test_line()
    assert line.endswith("python -m pytest -q") and "pip install" in line
    assert "readme_blocks.py test-line" in (REPO / ".ci" / "run").read_text()


def test_parser_honours_only_the_marker():
    text = ("a\n```bash\necho 1\n```\n<!-- not run by CI: needs two machines -->\n\n"
            "```bash\necho 2\n```\n<!-- a comment -->\n```bash\necho 3\n```\n"
            "<!-- not run by CI: x -->\ntext\n```bash\necho 4\n```\n")
    got = [(b.code, b.skip) for b in blocks(text)]
    assert got == [("echo 1\n", None), ("echo 2\n", "needs two machines"), ("echo 3\n", None),
                   ("echo 4\n", None)]
    code = runnable("pip install x && python -m pytest -q  # tests\nruff check\n"
                    "python -m pytest -q   # all\n")
    run = [ln for ln in code.splitlines() if not ln.startswith("echo ")]
    assert run == ["pip install x", "ruff check"]
    assert code.count("is the command CI is running") == 2


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{b.number:02d}-line{b.line}"
                                               for b in BLOCKS])
def test_readme_block(block: Block, scratch):
    if block.skip:
        pytest.skip(f"README block {block.number} (line {block.line}, {block.title!r}): "
                    f"not run by CI: {block.skip}")
    proc = run_block(block, scratch)
    assert proc.returncode == 0, (
        f"README block {block.number} (README.md line {block.line}) exited with "
        f"{proc.returncode}:\n{block.code}\n--- output (tail) ---\n{proc.stdout[-6000:]}")
    work = scratch["work"]
    for key, files in EXPECTED.items():
        if key in block.code:
            missing = [f for f in files if not (work / f).exists()]
            assert not missing, f"README block {block.number}: not written: {missing}"

"""Testing: evaluate pairs with and without refinement and write every output."""

from __future__ import annotations

import csv
import io as _io
import json
import math
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import yaml

from .. import layout, report
from ..data import PairSet
from ..errors import count
from ..io import array_to_image, write_image, write_text
from ..metrics import OVERLAP_METRICS, label_key, mean_metrics
from . import distributed
from .evaluate import STAGES, Evaluation, evaluate
from .model import Model
from .refine import RefineSettings

METRICS = ("dice", "hd", "hd95", "asd", "precision", "recall", "landmark_error",
           "landmark_error_gt")


def _clean(v):
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v


def label_columns(names: list[str] | None) -> list[str]:
    """The per-structure metric columns (``dice_1``, ``hd_1``, ...); none without names."""
    return [label_key(m, n) for n in names or [] for m in OVERLAP_METRICS]


def summarise(rows: list[dict] | None, names: list[str] | None = None) -> dict | None:
    """Means over pairs of every metric (None when undefined for all pairs).

    With structure ``names`` (a multi-label SoI) also ``labels``: ``{name: {metric:
    mean}}``; the plain keys then hold the means over pairs of each pair's mean over
    the structures.
    """
    if rows is None:
        return None
    means = mean_metrics(rows)
    out: dict = {k: _clean(means.get(k)) for k in METRICS}
    if names is not None:
        out["labels"] = {n: {m: _clean(means.get(label_key(m, n))) for m in OVERLAP_METRICS}
                         for n in names}
    return out


def run_test(model: Model, ps: PairSet, out: Path, device: torch.device, refine_iters: int,
             write_images: bool = True, progress: bool = True) -> dict | None:
    """Evaluate ``ps``; write images, YAML/CSV/JSON results and a picture grid to ``out/test``.

    Under torchrun every process evaluates its own shard of the pairs (``ps`` holds
    that shard) and writes its pairs' images; rank 0 merges the metrics, writes the
    results and returns the summary (the other processes return None).
    """
    d = distributed.current()
    folder = layout.test_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # a process may get no pairs (more processes than pairs): it only takes part in merging
    refinement = RefineSettings.from_config(model.cfg, refine_iters)
    res = evaluate(model, ps, device, refinement, progress=progress and d.main) if len(ps) \
        else None
    seconds = distributed.gather([time.perf_counter() - t0], d)  # the slowest process
    mine = []
    if res is not None:
        if write_images:
            _write_images(model, ps, res, folder)
        stages = res.stages()
        mine = [(name, {stage: rows[i] if rows is not None else None
                        for stage, rows in stages.items()}) for i, name in enumerate(ps.names)]
    merged = distributed.gather(mine, d)
    if merged is None:
        return None
    names = [name for name, _ in merged]
    rows = {stage: None if any(r[stage] is None for _, r in merged) else
            [r[stage] for _, r in merged] for stage in STAGES}
    names_soi = model.cfg.soi_names
    summary = {stage: summarise(rows[stage], names_soi) for stage in STAGES}
    summary["pairs"] = len(names)
    summary["strategy"] = model.strategy
    summary["transformation"] = model.transformation
    summary["refine_iterations"] = refine_iters
    summary["processes"] = d.world
    summary["seconds"] = max(seconds)
    _write_results(names, rows, folder, names_soi)
    write_text(json.dumps(summary, indent=2) + "\n", layout.test_summary(folder))
    if res is not None:
        report.pair_grid(ps, res, layout.test_pairs(folder), names=names_soi)
    report.cohort_html(report.pairs_from_test(names, rows, ps, res, names_soi),
                       layout.test_report(folder),
                       title=f"istn test: {model.strategy} / {model.transformation}, "
                       f"{count(len(names), 'pair')}")
    return summary


def _write_images(model: Model, ps: PairSet, res: Evaluation, folder: Path) -> None:
    """NIfTI outputs on the target's (network-grid) geometry, named by pair."""
    for i, name in enumerate(ps.names):
        ref = ps.references[i]
        items = {}
        if res.src_prime is not None:
            items["src_prime"] = res.src_prime[i]
            items["trg_prime"] = res.trg_prime[i]
        for tag, warped in (("", res.warped), ("_refined", res.warped_refined)):
            if warped is None:
                continue
            items[f"warped_src{tag}"] = warped.src[i]
            if warped.seg is not None:
                items[f"warped_seg{tag}"] = warped.seg[i]
            if warped.src_prime is not None:
                items[f"warped_src_prime{tag}"] = warped.src_prime[i]
        for key, arr in items.items():
            write_image(_channels_image(arr.numpy(), ref), layout.test_image(folder, name, key))


def _channels_image(arr, ref):
    """[C, *shape] as an image on ``ref``'s grid: scalar for C = 1, else one component
    per channel (a multi-label SoI's structures)."""
    if arr.shape[0] == 1:
        return array_to_image(arr[0], ref)
    img = sitk.GetImageFromArray(np.moveaxis(arr, 0, -1).astype(np.float32), isVector=True)
    img.CopyInformation(ref)
    return img


def _write_results(names: list[str], res: dict, folder: Path,
                   soi_names: list[str] | None = None) -> None:
    """test_results.yml / test_results_refined.yml (as published) and metrics.csv.

    ``res`` maps each stage to its per-pair metric rows (in the order of ``names``);
    ``soi_names``: the structures of a multi-label SoI (their columns follow).
    """
    columns = [*METRICS, *label_columns(soi_names)]
    for stage, refined in (("before_refinement", False), ("after_refinement", True)):
        rows = res[stage]
        if rows is None:
            continue
        doc = {"mean": summarise(rows, soi_names),
               "pairs": {name: {k: _clean(v) for k, v in row.items()}
                         for name, row in zip(names, rows, strict=True)}}
        write_text(yaml.safe_dump(doc, sort_keys=False), layout.test_results(folder, refined))
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["pair", "stage", *columns])
    for stage in STAGES:
        for name, row in zip(names, res[stage] or [], strict=False):
            w.writerow([name, stage, *["" if _clean(row.get(k)) is None else row[k]
                                       for k in columns]])
    write_text(buf.getvalue(), layout.test_metrics(folder))


def format_table(summary: dict) -> str:
    """A plain-text table of the summary (stages as rows)."""
    head = f"{'stage':<20}" + "".join(f"{k:>18}" for k in METRICS)
    lines = [head, "-" * len(head)]
    for stage in STAGES:
        s = summary.get(stage)
        if s is None:
            continue
        cells = "".join(f"{'n/a' if s[k] is None else f'{s[k]:.4f}':>18}" for k in METRICS)
        lines.append(f"{stage:<20}{cells}")
    return "\n".join(lines)

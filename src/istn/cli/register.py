"""``istn register``, ``istn apply`` and ``istn points``: use a trained model or its exports."""

from __future__ import annotations

import argparse
import csv
import io as _io
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import layout
from ..errors import IstnError, count
from .common import add_command, add_options, model_dir_name, setup_device


def add_parsers(sub) -> None:
    """``register``, ``apply`` and ``points``."""
    r = add_command(sub, "register", cmd_register, "register new pairs with a trained model; "
                    "export the warped images and the transformation in physical space")
    r.add_argument("--model", required=True, help=f"model folder ({model_dir_name()})")
    r.add_argument("--source", help="source (moving) image")
    r.add_argument("--target", help="target (fixed) image")
    r.add_argument("--source-seg", dest="source_seg", help="source segmentation (label map)")
    r.add_argument("--target-seg", dest="target_seg", help="target segmentation (label map)")
    r.add_argument("--source-points", dest="source_points",
                   help="CSV x,y[,z] of source landmarks (physical coordinates)")
    r.add_argument("--target-points", dest="target_points",
                   help="CSV x,y[,z] of the corresponding target landmarks")
    r.add_argument("--pairs", help="CSV of pairs (src,trg) to register instead of one pair; "
                   "optional columns src_seg,trg_seg,src_points,trg_points")
    r.add_argument("--seg-threshold", dest="seg_threshold", type=float, default=None,
                   help="binarise soft segmentations at this value (default: integer labels)")
    r.add_argument("--refine", type=int, default=None,
                   help="refinement iterations (default: the model's config; 0 to skip)")
    add_options(r, "out", "dev", "amp", "overwrite", "quiet", "debug",
                overwrite={"help": "replace previous results in --out"})

    a = add_command(sub, "apply", cmd_apply, "apply an exported transformation to another "
                    "image")
    add_options(a, "transform")
    a.add_argument("--input", required=True, help="image to warp (in the source's space)")
    a.add_argument("--reference", required=True, help="image defining the output grid "
                   "(the target)")
    add_options(a, "out", out={"help": "output image file"})
    a.add_argument("--labels", action="store_true", help="nearest-neighbour (label maps)")
    add_options(a, "debug")

    p = add_command(sub, "points", cmd_points, "map physical points (CSV x,y[,z]) through an "
                    "exported transformation")
    add_options(p, "transform")
    p.add_argument("--points", required=True, help="CSV with header x,y[,z]")
    add_options(p, "out", out={"help": "output CSV"})
    p.add_argument("--inverse", action="store_true",
                   help="map source points to the target (the exported transform maps target "
                   "points to the source, as ITK's TransformPoint does)")
    add_options(p, "debug")


PAIR_COLUMNS = ("src", "trg", "src_seg", "trg_seg", "src_points", "trg_points")


def _pairs_from_csv(path: Path) -> tuple[list, list | None, list | None]:
    from ..data import _resolve

    if not path.is_file():
        raise IstnError(f"pairs CSV '{path}' does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise IstnError(f"pairs CSV '{path}' cannot be parsed: {e}") from None
    if not rows or not {"src", "trg"} <= set(rows[0]):
        raise IstnError(f"pairs CSV '{path}' needs a header with columns src,trg "
                        "(optional src_seg,trg_seg,src_points,trg_points)")
    unknown = [c for c in rows[0] if c not in PAIR_COLUMNS]
    if unknown:  # a misspelt optional column would otherwise be ignored
        raise IstnError(f"pairs CSV '{path}' has the unknown column(s) "
                        f"{','.join(map(str, unknown))}; the columns are {','.join(PAIR_COLUMNS)}")
    get = lambda r, k: _resolve(r[k].strip(), path) if r.get(k) else None  # noqa: E731
    pairs = [(get(r, "src"), get(r, "trg")) for r in rows]
    if any(s is None or t is None for s, t in pairs):
        raise IstnError(f"pairs CSV '{path}': every row needs src and trg")
    segs = [(get(r, "src_seg"), get(r, "trg_seg")) for r in rows]
    pts = [(get(r, "src_points"), get(r, "trg_points")) for r in rows]
    return pairs, segs if any(a or b for a, b in segs) else None, \
        pts if any(a or b for a, b in pts) else None


def _inputs(args: argparse.Namespace, out: Path) -> tuple[list, list | None, list | None,
                                                         list[Path], list[str]]:
    """(pairs, segmentations, points, output folders, names) from --pairs or --source/--target.

    With --pairs every pair gets its own folder in ``out``; one pair writes into ``out``.
    """
    if args.pairs:
        if args.source or args.target:
            raise IstnError("give either --pairs or --source/--target, not both")
        pairs, segs, pts = _pairs_from_csv(Path(args.pairs))
        names = layout.register_pair_names([s for s, _ in pairs])
        return pairs, segs, pts, [out / n for n in names], names
    if not (args.source and args.target):
        raise IstnError("give --source and --target (or --pairs)")
    pairs = [(Path(args.source), Path(args.target))]
    segs = [(_opt(args.source_seg), _opt(args.target_seg))] if (
        args.source_seg or args.target_seg) else None
    pts = [(_opt(args.source_points), _opt(args.target_points))] if (
        args.source_points or args.target_points) else None
    return pairs, segs, pts, [out], ["pair"]


def cmd_register(args: argparse.Namespace) -> None:
    from .. import report
    from ..engine import distributed
    from ..engine.checkpoint import load_model
    from ..engine.register import register_pairs
    from ..io import write_text

    out = Path(args.out)
    pairs, segs, pts, dirs, names = _inputs(args, out)
    marker = layout.register_metrics(out) if args.pairs else layout.register_file(out, "warped")
    if marker.exists() and not args.overwrite:
        raise IstnError(f"output folder '{out}' already holds results; use --overwrite")
    device = setup_device(args.dev)
    model, _ = load_model(args.model, amp=args.amp)
    model.to(device)
    refine = model.cfg.refine if args.refine is None else args.refine
    if refine < 0:
        raise IstnError("--refine must be >= 0")
    # under torchrun each process registers every world-th pair; rank 0 merges the metrics
    d = distributed.current()
    mine = distributed.shard(list(range(len(pairs))), d)
    pick = lambda xs: [xs[i] for i in mine] if xs is not None else None  # noqa: E731
    results = register_pairs(model, pick(pairs), pick(dirs), device, refine, pick(segs),
                             pick(pts), args.seg_threshold, progress=not args.quiet and d.main
                             ) if mine else []
    results = distributed.gather(results, d)
    if results is None:
        return
    if args.pairs:
        write_text(_metrics_csv(names, results), layout.register_metrics(out))
        page = layout.register_report(out)
        report.cohort_html(report.pairs_from_register(names, dirs, page), page,
                           title=f"istn register: {count(len(pairs), 'pair')}")
        procs = f" on {d.world} processes" if d.active else ""
        print(f"registered {count(len(pairs), 'pair')}{procs}; results in '{out}' "
              f"({layout.register_metrics(out).name}, {page.name})")
    else:
        print(f"registered '{args.source}' to '{args.target}'; results in '{out}'")


def _opt(p: str | None) -> Path | None:
    return Path(p) if p else None


def _metrics_csv(names: list[str], results: list[dict]) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf)
    cols = ["dice", "hd", "hd95", "asd", "precision", "recall"]
    w.writerow(["pair", "label", *cols, "landmark_error", "jacobian_min",
                "jacobian_folding_percent"])
    for name, res in zip(names, results, strict=True):
        extra = [res.get(k, "") for k in ("landmark_error", "jacobian_min",
                                          "jacobian_folding_percent")]
        labels = res.get("labels") or {"": {}}
        for lab, m in labels.items():
            w.writerow([name, lab, *["" if m.get(c) is None else m[c] for c in cols], *extra])
    return buf.getvalue()


def cmd_apply(args: argparse.Namespace) -> None:
    from ..export import read_transform
    from ..io import read_image, write_image

    tx = read_transform(args.transform)
    img = read_image(args.input, "input image")
    ref = read_image(args.reference, "reference image")
    if img.GetDimension() != tx.GetDimension() or ref.GetDimension() != tx.GetDimension():
        raise IstnError(f"transform '{args.transform}' is {tx.GetDimension()}D but the images "
                        f"are {img.GetDimension()}D/{ref.GetDimension()}D")
    interp = sitk.sitkNearestNeighbor if args.labels else sitk.sitkLinear
    out = sitk.Resample(img, ref, tx, interp, 0.0)
    if args.labels:
        out = sitk.Cast(out, sitk.sitkInt32)
    write_image(out, args.out)
    print(f"wrote '{args.out}'")


def cmd_points(args: argparse.Namespace) -> None:
    from ..data import read_points, write_points
    from ..export import read_transform

    tx = read_transform(args.transform)
    pts = read_points(Path(args.points), tx.GetDimension())
    if args.inverse:
        mapped = np.array([_inverse_point(tx, p) for p in pts]).reshape(pts.shape)
    else:
        mapped = np.array([tx.TransformPoint(p.tolist()) for p in pts]).reshape(pts.shape)
    write_points(mapped, Path(args.out))
    print(f"mapped {len(pts)} points to '{args.out}'")


def _inverse_point(tx: sitk.Transform, y: np.ndarray, iterations: int = 100) -> np.ndarray:
    """Solve T(x) = y: exact for affine transforms, fixed-point iteration otherwise."""
    if not isinstance(tx, sitk.DisplacementFieldTransform):
        return np.array(tx.GetInverse().TransformPoint(y.tolist()))
    x = y.copy()  # displacement fields have no closed-form inverse
    for _ in range(iterations):
        x = x - (np.array(tx.TransformPoint(x.tolist())) - y)
    return x

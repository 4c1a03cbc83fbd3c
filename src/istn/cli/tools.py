"""``istn synth``, ``istn demo`` and ``istn cache``: data, a first run, the image cache."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..engine.distributed import select_device
from ..errors import IstnError
from .common import add_command, add_options


def add_data_parsers(sub) -> None:
    """``synth`` and ``demo``."""
    s = add_command(sub, "synth", cmd_synth, "generate a synthetic dataset with ground truth")
    s.add_argument("dim", choices=["2d", "3d", "brain"],
                   help="2D (PNG) or 3D (NIfTI) data; brain: MNI152 brain MRI (istn[brain])")
    add_options(s, "out")
    s.add_argument("--pairs", type=int, default=None,
                   help="training pairs (2D 100, 3D 20, brain 40)")
    s.add_argument("--val", type=int, default=10, help="validation pairs (default 10; "
                   "brain: none)")
    s.add_argument("--test", type=int, default=10, help="test pairs (default 10)")
    s.add_argument("--nonrigid", action="store_true",
                   help="brain: compose each affine with a smooth B-spline deformation")
    s.add_argument("--size", type=int, nargs="+", default=None,
                   help="image size x y [z] (default 128 128 / 64 64 64)")
    add_options(s, "seed", "debug")
    d = add_command(sub, "demo", cmd_demo, "synthetic 2D data, train ISTN-i affine, test, "
                    "report (a few minutes on a CPU)")
    add_options(d, "out", out={"required": False, "default": "istn_demo",
                               "help": "output folder (default istn_demo)"})
    add_options(d, "seed")
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default 40)")
    add_options(d, "dev", "overwrite", "quiet", "debug",
                overwrite={"help": "replace a previous demo in --out"})


def add_cache_parser(sub) -> None:
    c = add_command(sub, "cache", cmd_cache, "show or clear the cache of preprocessed images")
    c.add_argument("action", choices=["info", "clear"], help="info: folder, entries, size; "
                   "clear: delete the entries")
    add_options(c, "debug")


def cmd_synth(args: argparse.Namespace) -> None:
    if args.dim == "brain":
        return _synth_brain(args)
    from ..synth import generate

    dim = 2 if args.dim == "2d" else 3
    n = args.pairs if args.pairs is not None else (100 if dim == 2 else 20)
    if args.size is not None and len(args.size) != dim:
        raise IstnError(f"--size needs {dim} numbers for {args.dim} data, got {args.size}")
    t0 = time.perf_counter()
    out = generate(args.out, dim=dim, n_train=n, n_val=args.val, n_test=args.test,
                   size=args.size, seed=args.seed)
    print(f"wrote {args.dim} synthetic data (pairs: {n} train, {args.val} val, {args.test} "
          f"test) to '{out}' in {time.perf_counter() - t0:.1f} s")


def _synth_brain(args: argparse.Namespace) -> None:
    from ..brain import generate_brain

    if args.size is not None:
        raise IstnError("--size does not apply to brain data (sampled at 2 mm from the template)")
    n = args.pairs if args.pairs is not None else 40
    t0 = time.perf_counter()
    out = generate_brain(args.out, n_train=n, n_test=args.test, seed=args.seed,
                         nonrigid=args.nonrigid)
    print(f"wrote brain MRI data (pairs: {n} train, {args.test} test"
          f"{', nonrigid' if args.nonrigid else ''}) to '{out}' in "
          f"{time.perf_counter() - t0:.1f} s")


def cmd_demo(args: argparse.Namespace) -> None:
    from ..demo import run_demo

    run_demo(Path(args.out), seed=args.seed, epochs=args.epochs, device=select_device(args.dev),
             overwrite=args.overwrite, progress=not args.quiet)


def cmd_cache(args: argparse.Namespace) -> None:
    from ..cache import cache_info, clear_cache

    if args.action == "clear":
        folder = cache_info()[0]
        print(f"removed {clear_cache()} files from '{folder}'")
    else:
        folder, entries, size = cache_info()
        print(f"cache: '{folder}': {entries} entries, {size / 1e6:.1f} MB "
              "(ISTN_CACHE_DIR moves it, ISTN_NO_CACHE=1 turns it off)")

"""Command line: ``istn {train,test,synth,demo}`` and the published ``istn-reg``.

Thin: parses, validates, calls the engine. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from . import __version__, cli_register
from .config import Config, load_config
from .errors import IstnError

CONFIG_KEYS = ("epochs", "refine", "learning_rate", "batch_size", "val_interval")
DEFAULT_3D = {"size": [64, 64, 64], "spacing": [2.0, 2.0, 2.0], "batch_size": 2}


# ----------------------------------------------------------------------------- helpers

def select_device(dev: str | int | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or an integer N (CUDA device N); default: cuda:0 if present."""
    if dev is None or dev == "":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    name = f"cuda:{dev}" if str(dev).isdigit() else str(dev)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise IstnError(f"--dev/--device '{dev}' is not a device; "
                        "use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise IstnError(f"--dev/--device '{dev}': no CUDA device is available; use cpu")
        if (device.index or 0) >= count:
            raise IstnError(f"--dev/--device '{dev}': only {count} CUDA device(s) exist "
                            f"(0..{count - 1})")
    elif device.type != "cpu":
        raise IstnError(f"--dev/--device '{dev}' is not supported; use cpu or cuda[:N]")
    return device


def setup_device(dev: str | int | None) -> torch.device:
    """:func:`select_device`, then join the torchrun process group when there is one.

    Under ``torchrun`` each process takes GPU ``LOCAL_RANK`` on CUDA.
    """
    from .engine import distributed

    return distributed.setup(select_device(dev))[1]


def say(*args) -> None:
    """print on the writing process only (rank 0 under torchrun)."""
    from .engine import distributed

    if distributed.current().main:
        print(*args)


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of handing it back to the system.

    Training and refinement free and reallocate the same tens of MB every iteration;
    by default glibc returns that memory each time and the next iteration pays
    thousands of page faults (about a fifth of a 2D refinement iteration). The
    setting is process-wide, so the command line sets it, never the library. Blocks
    over 32 MB are still mapped separately; a no-op without glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: heap (reusable) below 32 MB
        libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep up to 1 GB of free heap
    except (OSError, AttributeError):
        pass


def build_config(args: argparse.Namespace) -> Config:
    overrides = {k: getattr(args, k, None) for k in CONFIG_KEYS}
    if getattr(args, "config", None) is None and getattr(args, "mode3d", False):
        overrides = {**DEFAULT_3D, **{k: v for k, v in overrides.items() if v is not None}}
    cfg = load_config(getattr(args, "config", None), overrides)
    if getattr(args, "mode3d", False) and cfg.dim != 3:
        raise IstnError(f"--mode3d was given but config 'size' {cfg.size} is 2D; "
                        "give a 3D size (x, y, z)")
    return cfg


def prepare_out(out: Path, marker: Path, overwrite: bool, resume: bool = False,
                create: bool = True, clear: tuple[Path, ...] | None = None) -> None:
    """Refuse to mix with a previous run in ``out`` unless asked to overwrite or resume.

    ``create=False`` only checks (call it before loading anything, so that a refusal
    costs nothing and writes nothing). ``create=True`` (call it once every input is
    validated) removes the previous run's folders ``clear`` (default: the marker's
    folder) when ``overwrite`` is given, then creates ``out``.
    """
    if overwrite and resume:
        raise IstnError("--overwrite and --resume contradict each other (--resume continues "
                        "the run in --out, --overwrite replaces it); give only one")
    if out.exists() and not out.is_dir():
        raise IstnError(f"--out '{out}' exists and is not a folder; give a folder")
    if marker.exists() and not (overwrite or resume):
        raise IstnError(f"output folder '{out}' already holds a previous run ({marker.name}); "
                        "use --overwrite to replace it, --resume to continue, or another --out")
    if not create:
        return
    from .engine import distributed

    d = distributed.current()
    if overwrite and marker.exists() and d.main:
        for folder in clear or (marker.parent if marker.parent != out else out,):
            shutil.rmtree(folder, ignore_errors=True)
    distributed.barrier(d)  # nobody writes into a folder rank 0 is still removing
    out.mkdir(parents=True, exist_ok=True)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def do_train(args: argparse.Namespace, cfg: Config, device: torch.device):
    """Validate every input, then create the output folder and train.

    Data are loaded and checked before anything is written, so a bad input leaves
    no output folder behind (and --overwrite deletes nothing).
    """
    from .data import load_pairs, read_pair_csv
    from .engine.checkpoint import CHECKPOINT
    from .engine.model import Model
    from .engine.train import train
    from .losses import needs_seg

    out = Path(args.out)
    marker = out / "train" / "model" / CHECKPOINT
    prepare_out(out, marker, args.overwrite, args.resume, create=False)
    read_pair_csv(args.train, "image")  # a missing or malformed list first: cheap to check
    if needs_seg(args.loss):
        for flag, given, seg in (("--train", args.train, args.train_seg),
                                 ("--val", args.val, args.val_seg)):
            if given and not seg:
                raise IstnError(f"strategy '{args.loss}' needs segmentations for {flag}: give "
                                f"{flag}_seg (or use --loss u)")
    _seed(args.seed)
    model = Model.build(cfg, args.loss, args.transformation)
    model.amp = args.amp
    train_set = load_pairs(cfg, args.train, args.train_seg, args.train_msk)
    val_set = None
    if args.val:
        val_set = load_pairs(cfg, args.val, args.val_seg, args.val_msk,
                             getattr(args, "val_points", None),
                             getattr(args, "val_transforms", None))
    prepare_out(out, marker, args.overwrite, args.resume,
                clear=(out / "train", out / "tensorboard"))
    if args.resume:
        say(f"resuming from '{marker}'" if marker.is_file() else
            f"--resume: no checkpoint in '{marker.parent}' yet; starting at epoch 1")
    from .engine import distributed

    world = distributed.current().world
    on = f"{world} processes ({device.type})" if world > 1 else str(device)
    say(f"training {args.transformation} {args.loss} on {len(train_set)} pairs "
        f"({cfg.epochs} epochs, batch {cfg.batch_size}) on {on}; output in '{out}'")
    t0 = time.perf_counter()
    model_dir = train(model, train_set, val_set, out, device, args.seed, args.resume,
                      args.save_temp, progress=not args.quiet)
    say(f"trained in {time.perf_counter() - t0:.1f} s; model in '{model_dir}'")
    return model_dir


def do_test(args: argparse.Namespace, cfg: Config | None, device: torch.device,
            model_path: str, pairs=None) -> dict | None:
    """Load and check the model and the test pairs (``pairs``: already loaded), then test.

    Under torchrun each process loads and tests its shard of the pairs; rank 0
    writes the merged results and returns the summary (None elsewhere).
    """
    from .data import load_pairs
    from .engine import distributed
    from .engine.checkpoint import load_model
    from .engine.test import format_table, run_test

    out = Path(args.out)
    marker = out / "test" / "summary.json"
    # istn-reg --resume re-tests the resumed model: its old results are replaced
    replace = bool(getattr(args, "resume", False) and getattr(args, "train", None))
    prepare_out(out, marker, args.overwrite, replace, create=False)
    model, _ = load_model(model_path, cfg, getattr(args, "loss", None),
                          getattr(args, "transformation", None))
    model.amp = args.amp
    refine = 0 if args.no_refine else model.cfg.refine
    ps = pairs if pairs is not None else load_pairs(
        model.cfg, args.test, args.test_seg, args.test_msk,
        getattr(args, "test_points", None), getattr(args, "test_transforms", None),
        part=_part())
    prepare_out(out, marker, args.overwrite and not replace, replace, clear=(out / "test",))
    model.to(device)
    summary = run_test(model, ps, out, device, refine, progress=not args.quiet)
    if summary is not None:
        print(format_table(summary))
        procs = distributed.current().world
        print(f"tested {summary['pairs']} pairs in {summary['seconds']:.1f} s"
              f"{f' on {procs} processes' if procs > 1 else ''}; results in '{out / 'test'}'")
    return summary


def _part() -> tuple[int, int]:
    """(rank, world) of this process, for loading its shard of the pairs."""
    from .engine import distributed

    d = distributed.current()
    return d.rank, d.world


# ----------------------------------------------------------------------------- parsers

def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config file (JSON or YAML); defaults to the published "
                   "synthetic 2D values (3D: 64^3 at 2 mm with --mode3d)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mode3d", action="store_true", help="3D data (checks the config is 3D)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dev", "--device", dest="dev", default=None,
                   help="device: cpu, cuda, cuda:N or N (CUDA device N); default cuda if present")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--amp", action="store_true", help="bf16 mixed precision (autocast) for "
                   "the networks; meant for GPUs (on a CPU it is usually slower)")
    for key, typ in (("epochs", int), ("refine", int), ("learning_rate", float),
                     ("batch_size", int), ("val_interval", int)):
        p.add_argument(f"--{key}", type=typ, default=None, help=f"override config '{key}'")


def _add_model_kind(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--transformation", choices=["affine", "bspline"],
                   default="affine" if required else None,
                   help="transformation model (default affine)")
    p.add_argument("--loss", choices=["u", "s", "e", "i"], default="i" if required else None,
                   help="strategy: u STN-u, s STN-s, e ISTN-e, i ISTN-i (default i)")


def _add_train(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--train", required=required, help="CSV of training pairs (src,trg)")
    p.add_argument("--train_seg", help="CSV of training segmentations (SoI)")
    p.add_argument("--train_msk", help="CSV of training masks (for normalisation statistics)")
    p.add_argument("--val", help="CSV of validation pairs")
    p.add_argument("--val_seg", help="CSV of validation segmentations")
    p.add_argument("--val_msk", help="CSV of validation masks")
    p.add_argument("--val_points", help="CSV of validation landmark images")
    p.add_argument("--val_transforms", help="CSV of validation ground-truth transforms")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--save_temp", action="store_true",
                   help="save a picture of validation pairs at every validation")


def _add_test(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--test", required=required, help="CSV of test pairs (src,trg)")
    p.add_argument("--test_seg", help="CSV of test segmentations (for Dice etc.)")
    p.add_argument("--test_msk", help="CSV of test masks")
    p.add_argument("--test_points", help="CSV of test landmark images or of point "
                   "CSVs x,y[,z] (landmark error)")
    p.add_argument("--test_transforms", help="CSV of ground-truth transforms "
                   "(landmark_error_gt; 4x4 files, image index -> template index)")
    p.add_argument("--no_refine", action="store_true", help="skip test-time refinement")


def reg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="istn-reg", description="ISTN registration with the published command line: "
        "trains when --train is given, then tests when --test is given.")
    _add_common(p)
    _add_model_kind(p, True)
    p.add_argument("--model", help="model folder or checkpoint to test (default OUT/train/model)")
    _add_train(p, False)
    _add_test(p, False)
    return p


def main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="istn", description="Image-and-Spatial Transformer "
                                "Networks for structure-guided image registration.")
    p.add_argument("--version", action="version", version=f"istn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train an ISTN on pairs listed in CSV files")
    _add_common(t)
    _add_model_kind(t, True)
    _add_train(t, True)
    e = sub.add_parser("test", help="evaluate a trained model (with test-time refinement)")
    _add_common(e)
    _add_model_kind(e, False)
    e.add_argument("--model", required=True, help="model folder (OUT/train/model) or checkpoint")
    _add_test(e, True)
    s = sub.add_parser("synth", help="generate a synthetic dataset with ground truth")
    s.add_argument("dim", choices=["2d", "3d"], help="2D (PNG) or 3D (NIfTI) data")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--pairs", type=int, default=None, help="training pairs (2D 100, 3D 20)")
    s.add_argument("--val", type=int, default=10, help="validation pairs (default 10)")
    s.add_argument("--test", type=int, default=10, help="test pairs (default 10)")
    s.add_argument("--size", type=int, nargs="+", default=None,
                   help="image size x y [z] (default 128 128 / 64 64 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    d = sub.add_parser("demo", help="synthetic 2D data, train ISTN-i affine, test, report "
                       "(a few minutes on a CPU)")
    d.add_argument("--out", default="istn_demo", help="output folder (default istn_demo)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default 40)")
    d.add_argument("--dev", "--device", dest="dev", default=None, help="device (default auto)")
    d.add_argument("--overwrite", action="store_true", help="replace a previous demo in --out")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    cli_register.add_parsers(sub)
    c = sub.add_parser("cache", help="show or clear the cache of preprocessed images")
    c.add_argument("action", choices=["info", "clear"], help="info: folder, entries, size; "
                   "clear: delete the entries")
    c.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


# ----------------------------------------------------------------------------- commands

def cmd_reg(args: argparse.Namespace) -> None:
    if not args.train and not args.test:
        raise IstnError("nothing to do: give --train (to train) and/or --test (to test)")
    cfg = build_config(args)
    device = setup_device(args.dev)
    out = Path(args.out)
    model = args.model
    test_set = None
    if args.train and args.test:
        # check the test side before training, so that no error waits for the end of training
        prepare_out(out, out / "test" / "summary.json", args.overwrite, args.resume,
                    create=False)
        if model is None:
            from .data import load_pairs

            test_set = load_pairs(cfg, args.test, args.test_seg, args.test_msk,
                                  args.test_points, args.test_transforms, part=_part())
        else:
            from .engine.checkpoint import load_model

            load_model(model, cfg, args.loss, args.transformation)
    if args.train:
        model_dir = do_train(args, cfg, device)
        model = model or str(model_dir)
    if args.test:
        if model is None:
            model = str(out / "train" / "model")
        do_test(args, cfg, device, model, test_set)


def cmd_train(args: argparse.Namespace) -> None:
    do_train(args, build_config(args), setup_device(args.dev))


def cmd_test(args: argparse.Namespace) -> None:
    cfg = build_config(args) if args.config else None
    if cfg is None and any(getattr(args, k) is not None for k in CONFIG_KEYS):
        from .engine.checkpoint import read_checkpoint

        saved = read_checkpoint(args.model)["meta"]["config"]
        cfg = load_config(None, {**saved, **{k: getattr(args, k) for k in CONFIG_KEYS}})
    do_test(args, cfg, setup_device(args.dev), args.model)


def cmd_synth(args: argparse.Namespace) -> None:
    from .synth import generate

    dim = 2 if args.dim == "2d" else 3
    n = args.pairs if args.pairs is not None else (100 if dim == 2 else 20)
    if args.size is not None and len(args.size) != dim:
        raise IstnError(f"--size needs {dim} numbers for {args.dim} data, got {args.size}")
    t0 = time.perf_counter()
    out = generate(args.out, dim=dim, n_train=n, n_val=args.val, n_test=args.test,
                   size=args.size, seed=args.seed)
    print(f"wrote {args.dim} synthetic data ({n} train, {args.val} val, {args.test} test "
          f"pairs) to '{out}' in {time.perf_counter() - t0:.1f} s")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), seed=args.seed, epochs=args.epochs, device=select_device(args.dev),
             overwrite=args.overwrite, progress=not args.quiet)


def cmd_cache(args: argparse.Namespace) -> None:
    from .cache import cache_info, clear_cache

    if args.action == "clear":
        folder = cache_info()[0]
        print(f"removed {clear_cache()} files from '{folder}'")
    else:
        folder, entries, size = cache_info()
        print(f"cache: '{folder}': {entries} entries, {size / 1e6:.1f} MB "
              "(ISTN_CACHE_DIR moves it, ISTN_NO_CACHE=1 turns it off)")


def _run(parser: argparse.ArgumentParser, argv: list[str] | None, dispatch) -> int:
    """Run a command; every failure is one line on stderr (a traceback only with --debug).

    Exit codes: 0 done, 2 user error (bad input, file, option) or an unusable
    environment (disk full, no permission, out of memory), 130 / 143 stopped by
    SIGINT / SIGTERM (training saves a checkpoint first), 1 an unexpected internal error.
    """
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    keep_freed_memory()

    def fail(message: str, code: int) -> int:
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        print(f"istn: {text}", file=sys.stderr)
        return code

    oom = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
    from .engine import distributed

    try:
        dispatch(args)
    except IstnError as e:
        code = getattr(e, "exit_code", 2)
        if debug and code == 2:
            raise
        if code != 2 and not hasattr(args, "resume"):  # no --resume to suggest (demo)
            return fail(getattr(e, "what", str(e)), code)
        return fail(f"error: {e}" if code == 2 else str(e), code)
    except KeyboardInterrupt:
        if debug:
            raise
        return fail("interrupted", 130)
    except oom:
        if debug:
            raise
        return fail("error: out of memory; lower batch_size or size, use --dev cpu, "
                    "or free memory (--debug shows where)", 2)
    except OSError as e:
        if debug:
            raise
        where = f" '{e.filename}'" if getattr(e, "filename", None) else ""
        return fail(f"error: {e.strerror or e}{where} (check the path, permissions and free "
                    "disk space)", 2)
    except Exception as e:
        if debug:
            raise
        return fail(f"internal error: {type(e).__name__}: {e}; this is a bug or an input "
                    "istn does not check yet: rerun with --debug for the traceback and "
                    "report it", 1)
    finally:
        distributed.teardown()
    return 0


def main(argv: list[str] | None = None) -> int:
    commands = {"train": cmd_train, "test": cmd_test, "synth": cmd_synth, "demo": cmd_demo,
                "register": cli_register.cmd_register, "apply": cli_register.cmd_apply,
                "points": cli_register.cmd_points, "cache": cmd_cache}
    return _run(main_parser(), argv, lambda a: commands[a.command](a))


def main_reg(argv: list[str] | None = None) -> int:
    return _run(reg_parser(), argv, cmd_reg)


if __name__ == "__main__":
    sys.exit(main())

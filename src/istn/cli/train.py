"""``istn train``, ``istn test`` and the published one-command ``istn-reg``.

Every input is validated before the output folder is created or cleared, so a bad
input leaves no output folder behind and ``--overwrite`` deletes nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .. import layout
from ..config import LEGACY_DEFAULTS, Config, load_config
from ..errors import IstnError, count
from ..spatial import TRANSFORMATIONS
from .common import (
    Parser,
    add_command,
    add_options,
    model_dir_name,
    prepare_out,
    release_lock,
    say,
    setup_device,
    take_lock,
)

CONFIG_KEYS = ("epochs", "refine", "learning_rate", "batch_size", "val_interval")
TEST_KEYS = ("refine", "learning_rate")  # the overrides testing uses (refinement)
DEFAULT_3D = {"size": [64, 64, 64], "spacing": [2.0, 2.0, 2.0], "batch_size": 2}


# ----------------------------------------------------------------------------- parsers

def _add_common(p: argparse.ArgumentParser, training: bool = True) -> None:
    """The shared options; ``training=False`` (istn test) leaves out what only training uses."""
    p.add_argument("--config", help="config file (JSON or YAML); defaults to the published "
                   "synthetic 2D values (3D: 64^3 at 2 mm with --mode3d)" if training else
                   "config file (JSON or YAML) to check the model against; default: the "
                   "model's own")
    add_options(p, "out")
    p.add_argument("--mode3d", action="store_true", help="3D data (checks the config is 3D)")
    add_options(p, *(("seed",) if training else ()), "dev", "overwrite", "quiet", "debug", "amp")
    for key, typ in (("epochs", int), ("refine", int), ("learning_rate", float),
                     ("batch_size", int), ("val_interval", int)):
        if training or key in TEST_KEYS:
            p.add_argument(f"--{key}", type=typ, default=None, help=f"override config '{key}'"
                           + ("" if training or key == "refine" else
                              " (refinement's, unless the config sets refine_learning_rate)"))


def _add_model_kind(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--transformation", choices=list(TRANSFORMATIONS),
                   default="affine" if required else None,
                   help="transformation model (default affine)" if required else
                   "transformation model to check the model against (default: the model's)")
    p.add_argument("--loss", choices=["u", "s", "e", "i"], default="i" if required else None,
                   help="strategy: u STN-u, s STN-s, e ISTN-e, i ISTN-i "
                   + ("(default i)" if required else "to check the model against (default: "
                      "the model's)"))


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


def add_parsers(sub) -> None:
    """``train`` and ``test``."""
    t = add_command(sub, "train", cmd_train, "train an ISTN on pairs listed in CSV files")
    _add_common(t)
    _add_model_kind(t, True)
    _add_train(t, True)
    e = add_command(sub, "test", cmd_test, "evaluate a trained model (with test-time "
                    "refinement)")
    _add_common(e, training=False)
    _add_model_kind(e, False)
    e.add_argument("--model", required=True,
                   help=f"model folder ({model_dir_name()}) or checkpoint")
    _add_test(e, True)


def reg_parser() -> argparse.ArgumentParser:
    """The parser of ``istn-reg`` (the published command line)."""
    p = Parser(
        prog="istn-reg", description="ISTN registration with the published command line: "
        "trains when --train is given, then tests when --test is given. Options take - or _ "
        "alike (--train_seg or --train-seg).")
    _add_common(p)
    _add_model_kind(p, True)
    p.add_argument("--model", help="model folder or checkpoint to test "
                   f"(default {model_dir_name()}); with --train it can only be "
                   f"{model_dir_name()}, where the model is written")
    _add_train(p, False)
    _add_test(p, False)
    return p


# ----------------------------------------------------------------------------- steps

def build_config(args: argparse.Namespace) -> Config:
    """The config file (or the defaults; 3D ones with --mode3d) with the options' overrides."""
    overrides = {k: getattr(args, k, None) for k in CONFIG_KEYS}
    if getattr(args, "config", None) is None and getattr(args, "mode3d", False):
        overrides = {**DEFAULT_3D, **{k: v for k, v in overrides.items() if v is not None}}
    cfg = load_config(getattr(args, "config", None), overrides)
    if getattr(args, "mode3d", False) and cfg.dim != 3:
        raise IstnError(f"--mode3d was given but config 'size' {cfg.size} is 2D; "
                        "give a 3D size (x, y, z)")
    return cfg


def _part() -> tuple[int, int]:
    """(rank, world) of this process, for loading its shard of the pairs."""
    from ..engine import distributed

    d = distributed.current()
    return d.rank, d.world


def _check_train_inputs(args: argparse.Namespace) -> None:
    """The cheap checks first: a missing or malformed list, missing segmentations."""
    from ..data import read_pair_csv
    from ..losses import needs_seg

    read_pair_csv(args.train, "image")
    if needs_seg(args.loss):
        for flag, given, seg in (("--train", args.train, args.train_seg),
                                 ("--val", args.val, args.val_seg)):
            if given and not seg:
                raise IstnError(f"strategy '{args.loss}' needs segmentations for {flag}: give "
                                f"{flag}_seg (or use --loss u)")


def do_train(args: argparse.Namespace, cfg: Config, device: torch.device) -> Path:
    """Validate every input, then create the output folder and train; returns the model folder.

    Data are loaded and checked before anything is written, so a bad input leaves
    no output folder behind (and --overwrite deletes nothing).
    """
    from ..data import load_pairs
    from ..engine import distributed
    from ..engine.model import Model
    from ..engine.train import train

    out = Path(args.out)
    marker = layout.checkpoint(layout.model_dir(out))
    prepare_out(out, marker, args.overwrite, args.resume, create=False)
    _check_train_inputs(args)
    torch.manual_seed(args.seed)
    model = Model(cfg, args.loss, args.transformation, amp=args.amp)
    train_set = load_pairs(cfg, args.train, args.train_seg, args.train_msk)
    val_set = None
    if args.val:
        val_set = load_pairs(cfg, args.val, args.val_seg, args.val_msk,
                             getattr(args, "val_points", None),
                             getattr(args, "val_transforms", None))
    # one training per --out: taken before --overwrite clears anything of a running one
    lock, main = layout.train_lock(out), distributed.current().main
    if main:
        take_lock(lock)
    try:
        prepare_out(out, marker, args.overwrite, args.resume,
                    clear=(layout.train_dir(out), layout.tensorboard_dir(out)))
        if main and not lock.exists():  # --overwrite removed OUT/train, the lock with it
            take_lock(lock)
        if args.resume:
            say(f"resuming from '{marker}'" if marker.is_file() else
                f"--resume: no checkpoint in '{marker.parent}' yet; starting at epoch 1")
        world = distributed.current().world
        on = f"{world} processes ({device.type})" if world > 1 else str(device)
        say(f"training {args.transformation} {args.loss} on {count(len(train_set), 'pair')} "
            f"({count(cfg.epochs, 'epoch')}, batch {cfg.batch_size}) on {on}; output in "
            f"'{out}'")
        t0 = time.perf_counter()
        model_dir = train(model, train_set, val_set, out, device, args.seed, args.resume,
                          args.save_temp, progress=not args.quiet)
    finally:
        if main:
            release_lock(lock)
    say(f"trained in {time.perf_counter() - t0:.1f} s; model in '{model_dir}'")
    return model_dir


def do_test(args: argparse.Namespace, cfg: Config | None, device: torch.device,
            model_path: str, pairs=None) -> dict | None:
    """Load and check the model and the test pairs (``pairs``: already loaded), then test.

    Under torchrun each process loads and tests its shard of the pairs; rank 0
    writes the merged results and returns the summary (None elsewhere).
    """
    from ..data import load_pairs
    from ..engine import distributed
    from ..engine.checkpoint import load_model
    from ..engine.test import format_table, run_test

    out = Path(args.out)
    test_dir = layout.test_dir(out)
    marker = layout.test_summary(test_dir)
    # istn-reg --resume re-tests the resumed model: its old results are replaced
    replace = bool(getattr(args, "resume", False) and getattr(args, "train", None))
    prepare_out(out, marker, args.overwrite, replace, create=False)
    model, _ = load_model(model_path, cfg, getattr(args, "loss", None),
                          getattr(args, "transformation", None), amp=args.amp)
    refine = 0 if args.no_refine else model.cfg.refine
    ps = pairs if pairs is not None else load_pairs(
        model.cfg, args.test, args.test_seg, args.test_msk,
        getattr(args, "test_points", None), getattr(args, "test_transforms", None),
        part=_part())
    prepare_out(out, marker, args.overwrite and not replace, replace, clear=(test_dir,))
    model.to(device)
    summary = run_test(model, ps, out, device, refine, progress=not args.quiet)
    if summary is not None:
        print(format_table(summary))
        procs = distributed.current().world
        print(f"tested {count(summary['pairs'], 'pair')} in {summary['seconds']:.1f} s"
              f"{f' on {procs} processes' if procs > 1 else ''}; results in '{test_dir}'")
    return summary


# ----------------------------------------------------------------------------- commands

# The published istn-reg.py's defaults (relative to the working directory): its command
# lines give neither --train nor --test and rely on them.
PUBLISHED_DEFAULTS = {"config": "data/synth2d/config.json",
                      "train": "data/synth2d/train.csv", "train_seg": "data/synth2d/train.seg.csv",
                      "val": "data/synth2d/val.csv", "val_seg": "data/synth2d/val.seg.csv",
                      "test": "data/synth2d/val.csv", "test_seg": "data/synth2d/val.seg.csv"}


def _published_defaults(args: argparse.Namespace) -> None:
    """Without --train and --test (2D), the published defaults whose files exist.

    Only then: a command that gives --train or --test is never changed by them.
    """
    if args.train or args.test or args.mode3d:
        return
    used = []
    for key, path in PUBLISHED_DEFAULTS.items():
        image_list = key.split("_")[0]  # a *_seg default only beside its image list's
        if getattr(args, key) is None and Path(path).is_file() and (
                key == image_list or getattr(args, image_list) == PUBLISHED_DEFAULTS[image_list]):
            setattr(args, key, path)
            used.append(f"--{key} {path}")
    if args.train or args.test:
        say(f"istn-reg: no --train or --test given: the published defaults {', '.join(used)}")


def cmd_reg(args: argparse.Namespace) -> None:
    """``istn-reg``: train when --train is given, then test when --test is given."""
    _published_defaults(args)
    if not args.train and not args.test:
        raise IstnError("nothing to do: give --train (to train) and/or --test (to test), or "
                        f"run where the published defaults ({PUBLISHED_DEFAULTS['train']}, "
                        f"{PUBLISHED_DEFAULTS['val']}) exist")
    cfg = build_config(args)
    device = setup_device(args.dev)
    out = Path(args.out)
    model = args.model
    if args.train:  # the model tested is the one trained: --model may only name its folder
        _check_trained_model(model, out)
        model = None
    test_set = None
    if args.train and args.test:
        # check the test side before training, so that no error waits for the end of training
        prepare_out(out, layout.test_summary(layout.test_dir(out)), args.overwrite,
                    args.resume, create=False)
        from ..data import load_pairs

        test_set = load_pairs(cfg, args.test, args.test_seg, args.test_msk,
                              args.test_points, args.test_transforms, part=_part())
    if args.train:
        model = str(do_train(args, cfg, device))
    if args.test:
        if model is None:
            model = str(layout.model_dir(out))
        do_test(args, cfg, device, model, test_set)


def _check_trained_model(model: str | None, out: Path) -> None:
    """With --train, --model can only name the folder training writes (the published form).

    Writing the model elsewhere too would leave two copies to keep in step, so another
    folder is refused.
    """
    if model is None:
        return
    where = layout.model_dir(out)
    given = Path(model)
    if given.name == layout.CHECKPOINT:
        given = given.parent
    if given.resolve() != where.resolve():
        raise IstnError(f"--model '{model}' with --train: the model is written to '{where}' "
                        "(--out's train/model); give that folder or leave --model out")


def cmd_train(args: argparse.Namespace) -> None:
    do_train(args, build_config(args), setup_device(args.dev))


def cmd_test(args: argparse.Namespace) -> None:
    """Test ``--model``; config overrides apply to the config saved with the model."""
    cfg = build_config(args) if args.config else None
    if cfg is None and any(getattr(args, k, None) is not None for k in CONFIG_KEYS):
        from ..engine.checkpoint import read_checkpoint

        saved = read_checkpoint(args.model)["meta"]["config"]
        cfg = load_config(None, {**LEGACY_DEFAULTS, **saved,
                                 **{k: v for k in CONFIG_KEYS
                                    if (v := getattr(args, k, None)) is not None}})
    do_test(args, cfg, setup_device(args.dev), args.model)

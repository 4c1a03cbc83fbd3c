"""Command line: ``istn`` (train, test, synth, demo, register, apply, points, cache) and
the published ``istn-reg``.

Thin: parses, validates, calls the engine. User errors print one line and exit 2
(see :func:`.common.run`). Modules: ``common`` (shared options, devices, output
folders, error handling), ``train`` (train, test, istn-reg), ``register``
(register, apply, points), ``tools`` (synth, demo, cache). Each subcommand's parser
names the function that runs it (``func``).
"""

from __future__ import annotations

import argparse

from .._version import __version__
from . import register, tools, train
from .common import Parser, run

__all__ = ["main", "main_reg", "main_parser"]


def main_parser() -> argparse.ArgumentParser:
    p = Parser(prog="istn", description="Image-and-Spatial Transformer Networks for "
               "structure-guided image registration. Options take - or _ alike "
               "(--train_seg or --train-seg).")
    p.add_argument("--version", action="version", version=f"istn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    train.add_parsers(sub)
    tools.add_data_parsers(sub)
    register.add_parsers(sub)
    tools.add_cache_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """``istn COMMAND ...``; returns the exit code."""
    return run(main_parser(), argv, lambda args: args.func(args))


def main_reg(argv: list[str] | None = None) -> int:
    """``istn-reg ...``; returns the exit code."""
    return run(train.reg_parser(), argv, train.cmd_reg)

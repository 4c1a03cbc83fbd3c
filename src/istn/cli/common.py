"""What every command shares: options, device selection, output folders, error handling."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import layout
from ..errors import IstnError

# Options several commands take, declared once: name -> (flags, add_argument keywords).
# A command adds them with add_options(parser, name, ...), in the order it lists them.
OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "out": (("--out",), {"required": True, "help": "output folder"}),
    "seed": (("--seed",), {"type": int, "default": 0, "help": "random seed (default 0)"}),
    "dev": (("--dev", "--device"), {
        "dest": "dev", "default": None,
        "help": "device: cpu, cuda, cuda:N or N (CUDA device N); default cuda if present"}),
    "overwrite": (("--overwrite",), {"action": "store_true",
                                     "help": "replace a previous run in --out"}),
    "quiet": (("--quiet",), {"action": "store_true", "help": "no progress bars"}),
    "debug": (("--debug",), {"action": "store_true", "help": "show tracebacks for errors"}),
    "amp": (("--amp",), {"action": "store_true",
                         "help": "bf16 mixed precision (autocast) for the networks; meant for "
                         "GPUs (on a CPU it is usually slower)"}),
    "transform": (("--transform",), {
        "required": True, "help": f"{layout.REGISTER_FILES['affine']} or "
        f"{layout.REGISTER_FILES['field']}"}),
}


def _other_spelling(flag: str) -> str | None:
    """``--train-seg`` for ``--train_seg`` and back; None for flags without a separator."""
    if not flag.startswith("--") or not ("_" in flag or "-" in flag[2:]):
        return None
    body = flag[2:]
    return "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose options take ``_`` and ``-`` alike (``--train_seg``,
    ``--train-seg``): the other spelling is accepted, the help shows the first one.

    Subcommands' parsers are of the same class (argparse creates them with ``type(self)``).
    """

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action:
        others = [o for f in flags if (o := _other_spelling(f)) and o not in flags]
        action = super().add_argument(*flags, **kwargs)
        for other in others:  # registered after the fact: the help lists only ``flags``
            self._option_string_actions[other] = action
        return action

    def _get_option_tuples(self, option_string: str) -> list[tuple]:
        # an abbreviation (--save) matching both spellings of one option is not ambiguous
        seen: set[int] = set()
        unique = []
        for match in super()._get_option_tuples(option_string):
            if id(match[0]) not in seen:
                seen.add(id(match[0]))
                unique.append(match)
        return unique


def add_options(parser: argparse.ArgumentParser, *names: str,
                **changes: dict[str, Any]) -> None:
    """Add the shared options ``names`` in order; ``changes[name]`` replaces keywords of one."""
    for name in names:
        flags, keywords = OPTIONS[name]
        parser.add_argument(*flags, **{**keywords, **changes.get(name, {})})


def add_command(sub, name: str, func: Callable[[argparse.Namespace], None],
                help: str) -> argparse.ArgumentParser:
    """A subcommand whose parsed arguments run ``func`` (see :func:`main` in the package)."""
    p = sub.add_parser(name, help=help)
    p.set_defaults(func=func)
    return p


def model_dir_name() -> str:
    """``OUT/train/model`` as help texts show it."""
    return layout.model_dir(Path("OUT")).as_posix()


# ----------------------------------------------------------------------------- devices

def setup_device(dev: str | int | None) -> torch.device:
    """:func:`select_device`, then join the torchrun process group when there is one.

    Under ``torchrun`` each process takes GPU ``LOCAL_RANK`` on CUDA.
    """
    from ..engine import distributed

    return distributed.setup(distributed.select_device(dev))[1]


def say(*args) -> None:
    """print on the writing process only (rank 0 under torchrun)."""
    from ..engine import distributed

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


# ----------------------------------------------------------------------------- output

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
    from ..engine import distributed

    d = distributed.current()
    if overwrite and marker.exists() and d.main:
        for folder in clear or (marker.parent if marker.parent != out else out,):
            shutil.rmtree(folder, ignore_errors=True)
    distributed.barrier(d)  # nobody writes into a folder rank 0 is still removing
    out.mkdir(parents=True, exist_ok=True)


def _holder(lock: Path) -> tuple[int, str] | None:
    """(PID, host) written in ``lock``; None while it is being written or if unreadable."""
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def take_lock(lock: Path) -> None:
    """Create ``lock`` (O_CREAT | O_EXCL: one process wins) holding this PID and host.

    A lock whose process no longer runs on this host (a killed training) is taken
    over with a warning; a live one is refused with one line naming the folder.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is not None and holder[1] == host and not _alive(holder[0]):
                print(f"istn: warning: taking over the stale lock '{lock}' of process "
                      f"{holder[0]}, which no longer runs", file=sys.stderr)
                lock.unlink(missing_ok=True)
                continue
            who = f"process {holder[0]} on {holder[1]}" if holder else "another process"
            raise IstnError(f"output folder '{lock.parent}' is in use by another training "
                            f"({who}, lock file {lock.name}); wait for it to end or use another "
                            f"--out (if no training runs, delete '{lock}')") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {host}\n")
        return
    raise IstnError(f"cannot take the lock '{lock}': other processes keep taking it; "
                    "use another --out")


def release_lock(lock: Path) -> None:
    """Remove ``lock`` if this process holds it."""
    if _holder(lock) == (os.getpid(), socket.gethostname()):
        lock.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- running

def _fail(message: str, code: int) -> int:
    """Print ``message`` as one line ``istn: ...`` on stderr; return ``code``."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"istn: {text}", file=sys.stderr)
    return code


def run(parser: argparse.ArgumentParser, argv: list[str] | None,
        dispatch: Callable[[argparse.Namespace], None]) -> int:
    """Run a command; every failure is one line on stderr (a traceback only with --debug).

    Exit codes: 0 done, 2 user error (bad input, file, option) or an unusable
    environment (disk full, no permission, out of memory), 130 / 143 stopped by
    SIGINT / SIGTERM (training saves a checkpoint first), 1 an unexpected internal error.
    """
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    keep_freed_memory()
    oom = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
    from ..engine import distributed

    try:
        dispatch(args)
        # every process leaves the group together: a rank that finished early (nothing
        # to register) destroying it while others still tear theirs down was seen to
        # abort ('terminate called without an active exception'); errors skip this
        distributed.barrier(distributed.current())
    except IstnError as e:
        code = getattr(e, "exit_code", 2)  # TrainingInterrupted: 128 + the signal
        if debug and code == 2:
            raise
        if code != 2 and not hasattr(args, "resume"):  # no --resume to suggest (demo)
            return _fail(getattr(e, "what", str(e)), code)
        return _fail(f"error: {e}" if code == 2 else str(e), code)
    except KeyboardInterrupt:
        if debug:
            raise
        return _fail("interrupted", 130)
    except oom:
        if debug:
            raise
        return _fail("error: out of memory; lower batch_size or size, use --dev cpu, "
                     "or free memory (--debug shows where)", 2)
    except OSError as e:
        if debug:
            raise
        where = f" '{e.filename}'" if getattr(e, "filename", None) else ""
        return _fail(f"error: {e.strerror or e}{where} (check the path, permissions and free "
                     "disk space)", 2)
    except Exception as e:
        if debug:
            raise
        return _fail(f"internal error: {type(e).__name__}: {e}; this is a bug or an input "
                     "istn does not check yet: rerun with --debug for the traceback and "
                     "report it", 1)
    finally:
        distributed.teardown()
    return 0

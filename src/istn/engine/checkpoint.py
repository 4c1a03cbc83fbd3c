"""Checkpoints of a :class:`~.model.Model`: writing, safe reading, checks and loading.

Checkpoints hold only tensors and plain data (loaded with ``weights_only=True``, so a
crafted file cannot run code) and are written atomically. Their metadata (strategy,
transformation, dimension, size, spacing, normalisers, network scaling) and weight
shapes are checked before any weight is loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from .. import layout
from ..config import Config, from_dict
from ..errors import IstnError
from ..io import write_atomically, write_text
from ..losses import STRATEGIES, uses_itn
from ..spatial import TRANSFORMATIONS, transformation_class
from .model import NETWORK_KEYS, Model, Scaling

CHECKPOINT = layout.CHECKPOINT


def save_checkpoint(model: Model, path: Path, optimizer: torch.optim.Optimizer | None = None,
                    epoch: int = 0, extra: dict[str, Any] | None = None) -> None:
    """Write weights, optimiser state, epoch, RNG state and metadata atomically.

    ``epoch`` is the last *completed* epoch. ``extra`` holds plain values and tensors
    only (training: history, seed, number of pairs and, for a checkpoint written when
    training was interrupted mid-epoch, the position and partial sums of that epoch).
    The file is written to a temporary name, flushed to disk and renamed into place,
    so a crash or kill leaves either the previous or the new checkpoint, never a mix.
    """
    state = {
        "meta": model.meta(),
        "epoch": epoch,
        "stn": model.stn.state_dict(),
        "itn": model.itn.state_dict() if model.itn is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": torch.get_rng_state(),
        "extra": extra or {},
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    write_atomically(path, write)  # a failed write names 'path', not the temporary file


def _short(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file safely (``weights_only=True``); a folder means its checkpoint.pt.

    Nothing in the file is executed: ``weights_only`` unpickles tensors and plain
    containers only. The metadata (format, strategy, transformation, config) and the
    kinds of the stored objects are checked before anything uses them.
    """
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.is_file():
        raise IstnError(f"model '{path}' not found: give a model folder (OUT/train/model) "
                        f"holding {CHECKPOINT}, or a checkpoint file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, unsafe globals, truncated files
        if "Weights only load failed" in str(e):
            # torch's text advises weights_only=False, i.e. running the code: never quote it
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f" ({found.group(1)})" if found else ""
            raise IstnError(f"model '{p}' is not a readable istn checkpoint: it is refused "
                            f"because loading it would run code{what}, which is unsafe; istn "
                            "checkpoints hold only tensors and plain values: give one written "
                            "by istn train") from None
        raise IstnError(f"model '{p}' is not a readable istn checkpoint ({_short(e)}); "
                        "it may be corrupt, from another program, or unsafe to load") from None
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != "istn-checkpoint":
        raise IstnError(f"model '{p}' is not an istn checkpoint (no istn metadata); "
                        "give a checkpoint written by istn train")
    problem = None
    if meta.get("strategy") not in STRATEGIES:
        problem = f"unknown strategy {meta.get('strategy')!r}"
    elif meta.get("transformation") not in TRANSFORMATIONS:
        problem = f"unknown transformation {meta.get('transformation')!r}"
    elif not isinstance(meta.get("config"), dict):
        problem = "no config"
    elif not _is_state_dict(state.get("stn")):
        problem = "no STN weights"
    elif uses_itn(meta["strategy"]) and not _is_state_dict(state.get("itn")):
        problem = "no ITN weights"
    elif not isinstance(state.get("epoch", 0), int) or isinstance(state.get("epoch"), bool):
        problem = f"epoch {state.get('epoch')!r} is not an integer"
    if problem is not None:
        raise IstnError(f"model '{p}' is a damaged istn checkpoint ({problem})")
    from_dict(meta["config"], f"model '{p}' config", legacy=True)  # raises naming the bad key
    if not isinstance(state.get("extra"), dict):
        state["extra"] = {}
    return state


def describe_mismatch(meta: dict[str, Any], strategy: str | None = None,
                      transformation: str | None = None, cfg: Config | None = None,
                      keys: tuple[str, ...] = NETWORK_KEYS) -> list[str]:
    """What differs between a checkpoint's metadata and what a caller expects.

    Returns phrases like ``"strategy (--loss) 'i' (asked: 'u')"``; empty when all match.
    """
    saved = from_dict(meta["config"], "checkpoint config", legacy=True)
    diffs = []
    for name, want, have in (("strategy (--loss)", strategy, meta["strategy"]),
                             ("transformation", transformation, meta["transformation"])):
        if want is not None and want != have:
            diffs.append(f"{name} '{have}' (asked: '{want}')")
    if cfg is None:
        return diffs
    skip: tuple[str, ...] = ()
    if cfg.dim != saved.dim:
        diffs.append(f"dimension {saved.dim}D (asked: {cfg.dim}D)")
        skip = ("size", "spacing")
    for key in dict.fromkeys(tuple(keys) + _stn_keys(meta["transformation"])):
        if key in skip:
            continue
        have, want = getattr(saved, key), getattr(cfg, key)
        if isinstance(have, list) and isinstance(want, list):
            have, want = [float(v) for v in have], [float(v) for v in want]
        if have != want:
            diffs.append(f"{key} {getattr(saved, key)} (asked: {getattr(cfg, key)})")
    return diffs


def _stn_keys(transformation: str) -> tuple[str, ...]:
    """Config keys that shape the STN of a transformation model (from the registry)."""
    return tuple(transformation_class(transformation).options.values())


def check_weights(net: torch.nn.Module, weights: dict[str, torch.Tensor], what: str,
                  source: str) -> None:
    """Raise IstnError naming the first differing tensor before ``load_state_dict``."""
    own = net.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        detail = (f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'")
        raise IstnError(f"model '{source}': the {what} weights do not fit the network "
                        f"({detail}; {len(missing)} missing, {len(unexpected)} unexpected); "
                        "it is damaged or from an istn whose network differs: retrain it "
                        "with this istn")
    for k, v in own.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise IstnError(f"model '{source}': the {what} weight '{k}' has shape "
                            f"{list(weights[k].shape)} but the network needs {list(v.shape)}")


def upgrade_stn_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """STN weight names of istn 0.1 checkpoints (heads as STN attributes) in today's form.

    Then the head's layers sat beside the encoder (``fc.0.weight``, ``translation.bias``;
    B-spline ``head.weight``); now they sit in ``head`` (B-spline: ``head.linear``).
    Today's names (``encoder.``, ``head.``, a cascade's ``stages.``, ``keypoint_stn.``)
    are returned unchanged.
    """
    out = {}
    for k, v in weights.items():
        if k in ("head.weight", "head.bias"):
            k = "head.linear." + k[5:]
        elif not k.startswith(("encoder.", "head.", "stages.", "keypoint_stn.")):
            k = "head." + k
        out[k] = v
    return out


def load_weights(model: Model, state: dict[str, Any], source: str) -> None:
    """Check shapes and scaling, then load the weights and scaling of ``state`` into ``model``."""
    state["stn"] = upgrade_stn_weights(state["stn"])
    check_weights(model.stn, state["stn"], "STN", source)
    if model.itn is not None:
        check_weights(model.itn, state["itn"], "ITN", source)
    scaling = _read_scaling(state["meta"].get("scaling"), source)
    model.stn.load_state_dict(state["stn"])
    if model.itn is not None:
        model.itn.load_state_dict(state["itn"])
    model.scaling = scaling


def _read_scaling(value: Any, source: str) -> Scaling | None:
    """The checkpoint's network scaling (None in checkpoints of raw-value models)."""
    if value is None:
        return None
    try:
        out = {k: [float(value[k][0]), float(value[k][1])] for k in ("image", "seg")}
    except (KeyError, IndexError, TypeError, ValueError):
        raise IstnError(f"model '{source}': its 'scaling' metadata is damaged ({value!r}); "
                        "use a checkpoint written by istn train") from None
    if not all(math.isfinite(v) for pair in out.values() for v in pair) or \
            not all(pair[1] > 0 for pair in out.values()):
        raise IstnError(f"model '{source}': its 'scaling' metadata must hold finite means "
                        f"and positive standard deviations, got {value!r}")
    return out


def load_model(path: str | Path, cfg: Config | None = None, strategy: str | None = None,
               transformation: str | None = None, amp: bool = False
               ) -> tuple[Model, dict[str, Any]]:
    """Rebuild a Model from a checkpoint, checking it matches what the caller expects.

    Strategy, transformation, dimension, size, spacing, normalisers and the STN's
    options are compared with the caller's before any weight is loaded; a mismatch
    is an IstnError naming every difference.
    """
    state = read_checkpoint(path)
    meta = state["meta"]
    saved_cfg = from_dict(meta["config"], f"model '{path}' config", legacy=True)
    diffs = describe_mismatch(meta, strategy, transformation, cfg)
    if diffs:
        raise IstnError(f"model '{path}' does not match: it was trained with "
                        f"{'; '.join(diffs)}; use the model's own config and options")
    use_cfg = cfg if cfg is not None else saved_cfg
    model = Model(use_cfg, meta["strategy"], meta["transformation"], amp=amp)
    load_weights(model, state, str(path))
    if use_cfg.refine > 0 and set(use_cfg.refine_mode.split("+")) - {"lm"}:
        # torch.optim imports torch._dynamo at its first step (about a second on a CPU);
        # a model loaded to register pairs pays that here, once, not in the first pair
        # ('lm' uses no torch.optim optimiser, so it never pays it).
        import torch._dynamo  # noqa: F401
    return model, state


def write_model_info(model: Model, folder: Path) -> None:
    """Human-readable config and metadata beside the checkpoints."""
    write_text(json.dumps(model.meta(), indent=2) + "\n", layout.model_info(folder))

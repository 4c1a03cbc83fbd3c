"""The registration model (ITN + STN + strategy) and its checkpoints.

Checkpoints hold only tensors and plain data (loaded with ``weights_only=True``,
so a crafted file cannot run code) and are written atomically.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import Config, from_dict
from ..errors import IstnError
from ..io import atomic_path, write_text
from ..losses import STRATEGIES, check_strategy, uses_itn
from ..nets import ITN, STN, build_stn

CHECKPOINT = "checkpoint.pt"
TRANSFORMATIONS = ("affine", "bspline")
# Config keys that define the network or its input data: a model only fits data
# prepared with the same values.
NETWORK_KEYS = ("size", "spacing", "normalizer_img", "normalizer_seg", "grid_orientation",
                "grid_centre")


@dataclass
class Model:
    """A trained or training ISTN: config, strategy, transformation and networks."""

    cfg: Config
    strategy: str
    transformation: str
    itn: ITN | None
    stn: STN
    # bf16 autocast for the networks' forward passes (``--amp``; a runtime option, not
    # saved). Their outputs are cast back to float32, so the transformation, warping,
    # losses and metrics stay in float32.
    amp: bool = False
    # Network scaling (config 'network_scaling' 'auto', set when training starts and saved
    # in checkpoints): {"image": [mean, std], "seg": [mean, std]} of the training data.
    # The networks then see standardised values: the ITN maps standardised images to
    # standardised SoI, mapped back to SoI units, and the STN sees standardised inputs.
    # Adam's fixed step size then acts on weights and biases alike whatever the data's
    # units (raw 0..255 PNGs let the biases move by a tiny fraction of the activations).
    # None: raw values, as published.
    scaling: dict[str, list[float]] | None = None

    @classmethod
    def build(cls, cfg: Config, strategy: str, transformation: str) -> Model:
        check_strategy(strategy)
        itn = ITN(cfg.dim) if uses_itn(strategy) else None
        stn = build_stn(transformation, cfg.shape, 1, **cfg.stn_options(transformation))
        # Channels-last weights: on the CPU, convolution backward with these very small
        # channel counts is several times faster in this layout (same results).
        fmt = torch.channels_last if cfg.dim == 2 else torch.channels_last_3d
        for net in (itn, stn):
            if net is not None:
                net.to(memory_format=fmt)
        return cls(cfg, strategy, transformation, itn, stn)

    def to(self, device: torch.device | str) -> Model:
        if self.itn is not None:
            self.itn.to(device)
        self.stn.to(device)
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        ps = list(self.stn.parameters())
        return ps + (list(self.itn.parameters()) if self.itn is not None else [])

    def train(self, mode: bool = True) -> None:
        for net in (self.itn, self.stn):
            if net is not None:
                net.train(mode)

    def autocast(self) -> torch.autocast:
        """bf16 autocast on the networks' device when ``amp`` is set (else a no-op)."""
        device = next(self.stn.parameters()).device
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp)

    def primes(self, src: torch.Tensor, trg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S', T'): ITN outputs for ISTN-e/-i, the images themselves otherwise."""
        if self.itn is None:
            return src, trg
        x = torch.cat([src, trg], dim=0)
        if self.scaling is not None:
            mean, std = self.scaling["image"]
            x = (x - mean) / std
        with self.autocast():
            both = self.itn(x).float()
        if self.scaling is not None:
            mean, std = self.scaling["seg"]
            both = both * std + mean
        return both[: len(src)], both[len(src):]

    def stn_input(self, src_prime: torch.Tensor, trg_prime: torch.Tensor) -> torch.Tensor:
        """The STN's input [B, 2C, ...]: (S', T') stacked, standardised when scaling is set."""
        x = torch.cat([src_prime, trg_prime], dim=1)
        if self.scaling is not None:
            # S', T' are in SoI units for ISTN-e/-i, the images themselves for STN-u/-s
            mean, std = self.scaling["seg" if self.itn is not None else "image"]
            x = (x - mean) / std
        return x

    def params(self, src_prime: torch.Tensor, trg_prime: torch.Tensor) -> torch.Tensor:
        """The STN's transformation parameters for the pairs (S', T') (float32)."""
        x = self.stn_input(src_prime, trg_prime)
        with self.autocast():
            return self.stn(x).float()

    def meta(self) -> dict[str, Any]:
        return {"format": "istn-checkpoint", "istn_version": __version__,
                "strategy": self.strategy, "transformation": self.transformation,
                "dim": self.cfg.dim, "size": self.cfg.size, "spacing": self.cfg.spacing,
                "config": self.cfg.to_dict(), "scaling": self.scaling}


def scaling_from(src: torch.Tensor, trg: torch.Tensor, src_seg: torch.Tensor | None,
                 trg_seg: torch.Tensor | None) -> dict[str, list[float]]:
    """Mean and standard deviation (n - 1) of the training images and SoI, all voxels of both.

    A constant set (standard deviation 0) keeps the scale 1, so nothing divides by zero.
    """
    out = {"image": _mean_std(src, trg)}
    out["seg"] = _mean_std(src_seg, trg_seg) if src_seg is not None and trg_seg is not None \
        else [0.0, 1.0]
    return out


def _mean_std(*tensors: torch.Tensor) -> list[float]:
    # two passes in float64 over chunks of pairs: exact enough, without a float64 copy of
    # the whole set (a 3D training set can be hundreds of MB)
    chunks = [c for t in tensors for c in t.split(16)]
    n = sum(c.numel() for c in chunks)
    mean = sum(float(c.sum(dtype=torch.float64)) for c in chunks) / n
    sq = sum(float(((c.double() - mean) ** 2).sum()) for c in chunks)
    std = math.sqrt(sq / (n - 1)) if n > 1 else 0.0
    return [mean, std if std > 0 else 1.0]


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
    tmp = atomic_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        if isinstance(have, list):
            have, want = [float(v) for v in have], [float(v) for v in want]
        if have != want:
            diffs.append(f"{key} {getattr(saved, key)} (asked: {getattr(cfg, key)})")
    return diffs


def _stn_keys(transformation: str) -> tuple[str, ...]:
    """Config keys that shape the STN of a transformation model."""
    if transformation == "affine":
        return ("max_translation", "max_rotation", "max_scaling", "max_shearing")
    return ("bspline_spacing", "max_displacement", "bspline_zero_init")


def check_weights(net: torch.nn.Module, weights: dict[str, torch.Tensor], what: str,
                  source: str) -> None:
    """Raise IstnError naming the first differing tensor before ``load_state_dict``."""
    own = net.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        detail = (f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'")
        raise IstnError(f"model '{source}': the {what} weights do not fit the network "
                        f"({detail}; {len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in own.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise IstnError(f"model '{source}': the {what} weight '{k}' has shape "
                            f"{list(weights[k].shape)} but the network needs {list(v.shape)}")


def load_weights(model: Model, state: dict[str, Any], source: str) -> None:
    """Check shapes and scaling, then load the weights and scaling of ``state`` into ``model``."""
    check_weights(model.stn, state["stn"], "STN", source)
    if model.itn is not None:
        check_weights(model.itn, state["itn"], "ITN", source)
    scaling = _read_scaling(state["meta"].get("scaling"), source)
    model.stn.load_state_dict(state["stn"])
    if model.itn is not None:
        model.itn.load_state_dict(state["itn"])
    model.scaling = scaling


def _read_scaling(value: Any, source: str) -> dict[str, list[float]] | None:
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
               transformation: str | None = None) -> tuple[Model, dict[str, Any]]:
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
    model = Model.build(use_cfg, meta["strategy"], meta["transformation"])
    load_weights(model, state, str(path))
    return model, state


def write_model_info(model: Model, folder: Path) -> None:
    """Human-readable config and metadata beside the checkpoints."""
    write_text(json.dumps(model.meta(), indent=2) + "\n", folder / "model.json")

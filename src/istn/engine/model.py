"""The registration model (ITN + STN + strategy) and its checkpoints.

Checkpoints hold only tensors and plain data (loaded with ``weights_only=True``,
so a crafted file cannot run code) and are written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import Config, from_dict
from ..errors import IstnError
from ..io import atomic_path, write_text
from ..losses import check_strategy, uses_itn
from ..nets import ITN, STN, build_stn

CHECKPOINT = "checkpoint.pt"


@dataclass
class Model:
    """A trained or training ISTN: config, strategy, transformation and networks."""

    cfg: Config
    strategy: str
    transformation: str
    itn: ITN | None
    stn: STN

    @classmethod
    def build(cls, cfg: Config, strategy: str, transformation: str) -> Model:
        check_strategy(strategy)
        itn = ITN(cfg.dim) if uses_itn(strategy) else None
        stn = build_stn(transformation, cfg.shape, 1, **cfg.stn_options(transformation))
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

    def primes(self, src: torch.Tensor, trg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S', T'): ITN outputs for ISTN-e/-i, the images themselves otherwise."""
        if self.itn is None:
            return src, trg
        both = self.itn(torch.cat([src, trg], dim=0))
        return both[: len(src)], both[len(src):]

    def meta(self) -> dict[str, Any]:
        return {"format": "istn-checkpoint", "istn_version": __version__,
                "strategy": self.strategy, "transformation": self.transformation,
                "dim": self.cfg.dim, "size": self.cfg.size, "spacing": self.cfg.spacing,
                "config": self.cfg.to_dict()}


def save_checkpoint(model: Model, path: Path, optimizer: torch.optim.Optimizer | None = None,
                    epoch: int = 0, extra: dict[str, Any] | None = None) -> None:
    """Write weights, optimiser state, epoch, RNG state and metadata atomically."""
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
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file safely (``weights_only=True``); a folder means its checkpoint.pt."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.is_file():
        raise IstnError(f"model '{path}' not found: give a model folder (OUT/train/model) "
                        f"holding {CHECKPOINT}, or a checkpoint file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, unsafe globals, truncated files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IstnError(f"model '{p}' is not a readable istn checkpoint ({first[:200]}); "
                        "it may be corrupt, from another program, or unsafe to load") from None
    if not isinstance(state, dict) or state.get("meta", {}).get("format") != "istn-checkpoint":
        raise IstnError(f"model '{p}' is not an istn checkpoint")
    return state


def load_model(path: str | Path, cfg: Config | None = None, strategy: str | None = None,
               transformation: str | None = None) -> tuple[Model, dict[str, Any]]:
    """Rebuild a Model from a checkpoint, checking it matches what the caller expects."""
    state = read_checkpoint(path)
    meta = state["meta"]
    saved_cfg = from_dict(meta["config"], f"model '{path}' config")
    for name, want, have in (("strategy (--loss)", strategy, meta["strategy"]),
                             ("transformation", transformation, meta["transformation"])):
        if want is not None and want != have:
            raise IstnError(f"model '{path}' was trained with {name} '{have}', not '{want}'")
    if cfg is not None and (list(cfg.size) != list(saved_cfg.size)
                            or [float(s) for s in cfg.spacing] != saved_cfg.spacing):
        raise IstnError(f"model '{path}' was trained with size {saved_cfg.size} and spacing "
                        f"{saved_cfg.spacing}, but the config asks for size {cfg.size} and "
                        f"spacing {cfg.spacing}; use the model's config")
    use_cfg = cfg if cfg is not None else saved_cfg
    model = Model.build(use_cfg, meta["strategy"], meta["transformation"])
    try:
        model.stn.load_state_dict(state["stn"])
        if model.itn is not None:
            model.itn.load_state_dict(state["itn"])
    except RuntimeError as e:
        raise IstnError(f"model '{path}' weights do not fit the network: "
                        f"{str(e).splitlines()[-1].strip()}") from None
    return model, state


def write_model_info(model: Model, folder: Path) -> None:
    """Human-readable config and metadata beside the checkpoints."""
    write_text(json.dumps(model.meta(), indent=2) + "\n", folder / "model.json")

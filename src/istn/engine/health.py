"""Health of a training: dead ReLU layers and an STN that gives every pair one transformation.

Both states were seen with the published networks (their narrowest layers have two
and eight channels): a dead layer passes no gradient any more, so training cannot
revive it, and an STN whose outputs do not depend on the pair learnt late or never.
One probe (a forward pass over some pairs, no labels) measures both; training
restarts on it (:func:`collapse`) and validation warns with it (:func:`warning`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import count
from .model import Model

# Epoch from which an STN that gives every probed pair one transformation is a collapse.
COLLAPSE_EPOCH = 10
# Relative spread of the pairs' parameters (``param_spread``) at or below which the STN
# counts as giving every pair the same transformation.
SAME_TRANSFORMATION = 1e-7


@dataclass
class Health:
    """What one probe found: dead ReLU layers (names) and the parameters' relative spread."""

    dead: list[str]
    spread: float
    pairs: int

    @property
    def same_transformation(self) -> bool:
        return self.pairs > 1 and self.spread <= SAME_TRANSFORMATION


def param_spread(params: torch.Tensor) -> float:
    """Largest difference between pairs' parameters, relative to 1 + their size (inf: one pair).

    About 1e-9 when the STN has collapsed to one transformation for all pairs (only
    round-off differs); 1e-6 and more in trainings that went on to learn.
    """
    if len(params) < 2:
        return 0.0 if len(params) == 0 else float("inf")
    flat = params.flatten(1).double()
    return float((flat - flat[0]).abs().max() / (1 + flat.abs().max()))


@torch.no_grad()
def probe(model: Model, src: torch.Tensor, trg: torch.Tensor, batch: int = 16) -> Health:
    """Dead ReLU layers and parameter spread of ``model`` on the pairs, in one forward pass.

    Layer names are 'itn.<conv>' (the convolution before the ReLU) or 'stn.<ReLU module>'.
    """
    alive: dict[str, bool] = {}

    def hook(name):
        return lambda module, args, out: alive.__setitem__(
            name, alive.get(name, False) or bool((out > 0).any()))

    watched = ([(f"itn.{name}", getattr(model.itn, name)) for name in model.itn.RELU_LAYERS]
               if model.itn is not None else [])
    watched += [(f"stn.{name}", m) for name, m in model.stn.named_modules()
                if isinstance(m, torch.nn.ReLU)]
    hooks = [m.register_forward_hook(hook(name)) for name, m in watched]
    was_training = model.training
    model.train(False)
    params = []
    try:
        for i in range(0, len(src), batch):
            params.append(model.params(*model.primes(src[i:i + batch], trg[i:i + batch])))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    dead = [name for name, _ in watched if not alive.get(name, False)]
    return Health(dead, param_spread(torch.cat(params)), len(src))


def dead_layers(model: Model, src: torch.Tensor, trg: torch.Tensor) -> list[str]:
    """ReLU layers of the ITN and STN whose output is zero for every voxel of every pair."""
    return probe(model, src, trg).dead


def collapse(model: Model, src: torch.Tensor, trg: torch.Tensor, epoch: int) -> str | None:
    """Why training of ``model`` cannot succeed any more, judged on training pairs, or None.

    A dead ReLU layer, or, from epoch ``COLLAPSE_EPOCH`` on, an STN that still gives
    every pair the same transformation (relative spread <= 1e-7; such runs learnt late
    and ended far worse, while runs that trained well had spreads of 1e-3 and more by
    epoch 10). No labels are used.
    """
    h = probe(model, src, trg)
    if h.dead:
        return (f"layer(s) {', '.join(h.dead)} output zero for all "
                f"{count(h.pairs, 'probed training pair')} (dead ReLUs)")
    if epoch >= COLLAPSE_EPOCH and h.same_transformation:
        return (f"the STN gives all {h.pairs} probed training pairs the same "
                f"transformation (relative spread {h.spread:.1g})")
    return None


def warning(h: Health) -> str | None:
    """The validation warning for a probe of validation pairs (None when healthy)."""
    if not (h.dead or h.spread <= SAME_TRANSFORMATION):
        return None
    why = (f"layer(s) {', '.join(h.dead)} output zero for every pair (dead ReLUs)" if h.dead
           else f"its outputs differ by at most {h.spread:.1g} between pairs")
    return (f"the STN gives all {h.pairs} validation pairs the same transformation: {why}; "
            "trainings in this state did not recover or learnt late in our runs: retrain "
            "with another --seed (or allow 'restarts')")


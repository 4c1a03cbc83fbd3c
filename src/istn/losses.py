"""Training losses of the four strategies, written against a similarity of the registry.

``W(x)`` is ``x`` warped by the predicted transformation; ``S'``, ``T'`` are the
ITN outputs (or the images themselves for STN-u / STN-s). ``D`` is the configured
similarity (config 'similarity'; MSE as published):

    loss_itn   = MSE(ITN(S), S_seg) + MSE(ITN(T), T_seg)     (always MSE: a regression)
    loss_stn_u = D(W(S), T)
    loss_stn_s = D(W(S_seg), T_seg)
    loss_stn_i = D(W(ITN(S)), T_seg) + D(W(S_seg), ITN(T))
    loss_stn_r = D(W(S'), T')                         (refinement, per pair)

    u: loss_stn_u   s: loss_stn_s   e: loss_itn + loss_stn_s   i: loss_stn_i + loss_stn_s

With config 'soi_loss' (``soi``, e.g. Dice or MSE + Dice) every term that compares with
a SoI (loss_itn, loss_stn_s, loss_stn_i) uses it instead of MSE / ``D``. A SoI of
several structures has one channel each (S', T' too); every measure then averages its
per-channel values (:mod:`istn.similarity`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import IstnError
from .similarity import Similarity, new_similarity
from .spatial import warp

STRATEGIES = {"u": "STN-u", "s": "STN-s", "e": "ISTN-e", "i": "ISTN-i"}


def uses_itn(strategy: str) -> bool:
    """ISTN-e and ISTN-i feed ITN outputs to the STN; STN-u/-s feed the images."""
    return strategy in ("e", "i")


def needs_seg(strategy: str) -> bool:
    return strategy != "u"


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise IstnError(f"loss/strategy '{strategy}' is unknown; use one of u, s, e, i")
    return strategy


def training_loss(strategy: str, grid: torch.Tensor, src: torch.Tensor, trg: torch.Tensor,
                  src_prime: torch.Tensor, trg_prime: torch.Tensor,
                  src_seg: torch.Tensor | None, trg_seg: torch.Tensor | None,
                  similarity: Similarity | None = None, soi: Similarity | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total training loss of ``strategy`` and its named terms (for logging).

    ``similarity`` is ``D`` (default MSE); ``soi`` (default None: as published) the
    measure of the terms that compare with a SoI.
    """
    sim = similarity or new_similarity("mse")
    seg_sim = soi or sim
    terms: dict[str, torch.Tensor] = {}
    if strategy == "u":
        terms["stn_u"] = sim.mean(warp(src, grid), trg)
    else:
        if src_seg is None or trg_seg is None:
            raise IstnError(f"strategy '{strategy}' needs segmentations (--train_seg)")
        if strategy == "i":  # one resampling of both images (same grid: half the work)
            c = src_seg.shape[1]
            both = warp(torch.cat([src_seg, src_prime], dim=1), grid)
            warped_seg, warped_prime = both[:, :c], both[:, c:]
        else:
            warped_seg = warp(src_seg, grid)
        terms["stn_s"] = seg_sim.mean(warped_seg, trg_seg)
        if strategy == "e":
            if soi is None:  # the published regression
                terms["itn"] = F.mse_loss(src_prime, src_seg) + F.mse_loss(trg_prime, trg_seg)
            else:
                terms["itn"] = soi.mean(src_prime, src_seg) + soi.mean(trg_prime, trg_seg)
        elif strategy == "i":
            terms["stn_i"] = (seg_sim.mean(warped_prime, trg_seg)
                              + seg_sim.mean(warped_seg, trg_prime))
    return torch.stack(list(terms.values())).sum(), terms


def refinement_loss(grid: torch.Tensor, src_prime: torch.Tensor, trg_prime: torch.Tensor,
                    similarity: Similarity | None = None) -> torch.Tensor:
    """Per-pair ``D(W(S'), T')`` [B]: summing it keeps each pair's gradient its own."""
    sim = similarity or new_similarity("mse")
    return sim.per_pair(warp(src_prime, grid), trg_prime)

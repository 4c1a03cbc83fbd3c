"""Test-time refinement: per pair, minimise ``D(W(S'), T')`` with the ITN frozen.

The ITN outputs are computed once. All pairs of a chunk are refined together in one
batch, each with its own copy of what is optimised: the STN's weights (mode
'weights', as published; copies stacked by :mod:`.per_pair`) or the transformation
parameters (mode 'params'). Adam is element-wise, so summing the per-pair losses
gives every pair exactly its own optimisation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from ..config import Config
from ..losses import refinement_loss
from ..similarity import new_similarity
from .model import Model
from .per_pair import per_pair_stn

# Upper bound on stacked STN weights (+ Adam state) refined at once in 'weights' mode.
_MAX_STACKED_ELEMENTS = 60_000_000


@dataclass(frozen=True)
class RefineSettings:
    """How test-time refinement runs (built once from the config, see ``from_config``).

    ``mode`` 'weights' fine-tunes a copy of the STN per pair (published), 'params'
    optimises the transformation parameters directly; ``chunk`` pairs are refined
    together (0: as many as fit a memory bound); ``similarity`` names the measure of
    ``loss_stn_r = D(W(S'), T')`` in :mod:`istn.similarity`.
    """

    iterations: int
    learning_rate: float
    mode: str = "weights"
    chunk: int = 0
    similarity: str = "mse"

    @classmethod
    def from_config(cls, cfg: Config, iterations: int | None = None) -> RefineSettings:
        """Settings of ``cfg`` ('refine' iterations unless ``iterations`` is given)."""
        return cls(cfg.refine if iterations is None else iterations,
                   cfg.refine_learning_rate or cfg.learning_rate, cfg.refine_mode,
                   cfg.refine_batch, cfg.similarity)


def refine(model: Model, src_prime: torch.Tensor, trg_prime: torch.Tensor,
           settings: RefineSettings, progress: bool = True) -> torch.Tensor:
    """Refined transformation parameters for every pair (the ITN outputs are fixed)."""
    iterations, mode, chunk = settings.iterations, settings.mode, settings.chunk
    sim = new_similarity(settings.similarity)
    # Adam drives many weight updates towards zero; denormal floats then make CPU
    # arithmetic ~10x slower, so flush them (no effect on the results that matter).
    flush = torch.set_flush_denormal(True)
    n = len(src_prime)
    if chunk <= 0:
        per_pair = sum(p.numel() for p in model.stn.parameters()) * 4 if mode == "weights" else 1
        chunk = max(1, min(n, _MAX_STACKED_ELEMENTS // per_pair))
    out = []
    bar = tqdm(total=iterations * math.ceil(n / chunk), desc="refine", disable=not progress,
               leave=False)
    try:
        for i in range(0, n, chunk):
            s_p, t_p = src_prime[i:i + chunk].detach(), trg_prime[i:i + chunk].detach()
            fn = _refine_weights if mode == "weights" else _refine_params
            out.append(fn(model, s_p, t_p, iterations, settings.learning_rate, sim, bar))
    finally:
        bar.close()
        if flush:
            torch.set_flush_denormal(False)  # leave the process as found
    return torch.cat(out)


def _refine_params(model, s_p, t_p, iterations, lr, sim, bar) -> torch.Tensor:
    with torch.no_grad():
        params = model.params(s_p, t_p)
    params = params.clone().requires_grad_(True)
    opt = torch.optim.Adam([params], lr=lr)
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        refinement_loss(model.stn.grid(params), s_p, t_p, sim).sum().backward()
        opt.step()
        bar.update()
    return params.detach()


def _refine_weights(model, s_p, t_p, iterations, lr, sim, bar) -> torch.Tensor:
    stn = model.stn
    x = model.stn_input(s_p, t_p)
    per_pair = per_pair_stn(stn, len(s_p))
    if per_pair is None:  # a layer without a batched form: one vmapped copy per pair
        return _refine_weights_vmap(model, s_p, t_p, iterations, lr, sim, bar)
    weights = list(per_pair.parameters())
    opt = _adam(weights, lr)
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        refinement_loss(stn.grid(per_pair(x)), s_p, t_p, sim).sum().backward()
        opt.step()
        bar.update()
    with torch.no_grad():
        return per_pair(x)


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel where the device has one (one pass, not ~10 per tensor)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # no fused Adam for this device or dtype
        return torch.optim.Adam(params, lr=lr)


def _refine_weights_vmap(model, s_p, t_p, iterations, lr, sim, bar) -> torch.Tensor:
    """General form of ``_refine_weights``: one STN copy per pair under ``vmap``."""
    stn = model.stn
    weights, buffers = stack_module_state([copy.deepcopy(stn) for _ in range(len(s_p))])
    weights = {k: v.detach().requires_grad_(True) for k, v in weights.items()}
    x = model.stn_input(s_p, t_p).unsqueeze(1)  # [N, 1, 2C, *shape]: one pair per copy

    def one(w, b, xi):
        return functional_call(stn, (w, b), (xi,))

    batched = vmap(one)

    def params_now():
        return batched(weights, buffers, x).squeeze(1)

    opt = _adam(list(weights.values()), lr)
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        refinement_loss(stn.grid(params_now()), s_p, t_p, sim).sum().backward()
        opt.step()
        bar.update()
    with torch.no_grad():
        return params_now()

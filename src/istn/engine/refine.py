"""Test-time refinement: per pair, minimise ``D(W(S'), T')`` with the ITN frozen.

With config ``smoothness`` / ``bending`` > 0 each pair's deformation penalties are
added with those weights, as in training.

The ITN outputs are computed once. All pairs of a chunk are refined together in one
batch, each with its own copy of what is optimised: the STN's weights (mode
'weights', as published; copies stacked by :mod:`.per_pair`) or the transformation
parameters (mode 'params'). Adam is element-wise, so summing the per-pair losses
gives every pair exactly its own optimisation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from ..config import Config
from ..errors import IstnError
from ..filters import box_mean, gaussian_blur
from ..losses import refinement_loss
from ..similarity import Similarity, new_similarity
from ..spatial.grid import sample_points
from . import lm
from .model import Model
from .per_pair import per_pair_stn

# Upper bound on stacked STN weights (+ Adam state) refined at once in 'weights' mode.
_MAX_STACKED_ELEMENTS = 60_000_000


@dataclass(frozen=True)
class RefineSettings:
    """How test-time refinement runs (built once from the config, see ``from_config``).

    ``mode`` 'weights' fine-tunes a copy of the STN per pair (published), 'params'
    optimises the transformation parameters directly; ``chunk`` pairs are refined
    together (0: as many as fit a memory bound); ``similarity`` names the measure ``D``
    of :mod:`istn.similarity`; ``inputs`` 'primes' minimises ``D(W(S'), T')`` (published),
    'images' ``D(W(S), T)`` on the preprocessed images (the STN still sees S', T');
    ``tolerance`` > 0 stops early once no pair's loss fell by more than that fraction
    over the last ``PATIENCE`` iterations (0: always ``iterations``); ``stages``
    'sequential' refines a cascade's stages one after another (see ``_refine_chunk``),
    'joint' all together.
    """

    iterations: int
    learning_rate: float
    mode: str = "weights"
    chunk: int = 0
    similarity: str = "mse"
    inputs: str = "primes"
    tolerance: float = 0.0
    samples: int = 0
    levels: int = 1
    stages: str = "joint"

    @classmethod
    def from_config(cls, cfg: Config, iterations: int | None = None) -> RefineSettings:
        """Settings of ``cfg`` ('refine' iterations unless ``iterations`` is given)."""
        return cls(cfg.refine if iterations is None else iterations,
                   cfg.refine_learning_rate or cfg.learning_rate, cfg.refine_mode,
                   cfg.refine_batch, cfg.refine_similarity or cfg.similarity,
                   cfg.refine_inputs, cfg.refine_tolerance, cfg.refine_samples,
                   cfg.refine_levels, cfg.refine_stages)

    def phases(self, model: Model) -> int:
        """How many times ``iterations`` run per chunk: once, or once per cascade stage."""
        staged = self.stages == "sequential" and model.transform.stages
        return len(model.transform.stages) if staged else 1

    def stage_modes(self, model: Model) -> list[str]:
        """The mode of each refinement phase: ``mode``, or its '+'-joined per-stage modes."""
        modes = self.mode.split("+")
        phases = self.phases(model)
        if len(modes) == 1:
            return modes * phases
        if len(modes) != phases:
            raise IstnError(f"config: key 'refine_mode' '{self.mode}' names {len(modes)} "
                            f"stages, but refinement of '{model.transformation}' has "
                            f"{phases} (one mode per stage needs a cascade and "
                            "refine_stages 'sequential')")
        return modes


# Iterations over which the stopping rule measures each pair's progress.
PATIENCE = 10


def refine(model: Model, src_prime: torch.Tensor, trg_prime: torch.Tensor,
           settings: RefineSettings, progress: bool = True,
           images: tuple[torch.Tensor, torch.Tensor] | None = None,
           start: torch.Tensor | None = None) -> torch.Tensor:
    """Refined transformation parameters for every pair (the ITN outputs are fixed).

    ``images`` (source, target) are what the loss compares when ``settings.inputs`` is
    'images' or 'local' (on the network grid, or on a grid ``refine_resolution`` times
    finer with the same normalised coordinates); S', T' otherwise. ``start``: the
    model's prediction for the pairs where the caller has it (``model.params(S', T')``),
    so that modes 'params' and 'lm' need not run the STN again.
    """
    if settings.inputs != "primes" and images is None:
        raise ValueError(f"refinement on '{settings.inputs}' needs the images")
    sim = new_similarity(settings.similarity)
    # Adam drives many weight updates towards zero; denormal floats then make CPU
    # arithmetic ~10x slower, so flush them (no effect on the results that matter).
    flush = torch.set_flush_denormal(True)
    n, chunk = len(src_prime), settings.chunk
    if chunk <= 0:
        per_pair = (sum(p.numel() for p in model.stn.parameters()) * 4
                    if "weights" in settings.stage_modes(model) else 1)
        chunk = max(1, min(n, _MAX_STACKED_ELEMENTS // per_pair))
    out = []
    bar = tqdm(total=settings.iterations * settings.phases(model) * math.ceil(n / chunk),
               desc="refine",
               disable=not progress, leave=False)
    try:
        for i in range(0, n, chunk):
            part = slice(i, i + chunk)
            s_p, t_p = src_prime[part].detach(), trg_prime[part].detach()
            s_l, t_l = ((images[0][part].detach(), images[1][part].detach())
                        if settings.inputs != "primes" else (s_p, t_p))
            first = start[part].detach() if start is not None else None
            out.append(_refine_chunk(model, s_p, t_p, s_l, t_l, settings, sim, i, bar, first))
    finally:
        bar.close()
        if flush:
            torch.set_flush_denormal(False)  # leave the process as found
    return torch.cat(out)


def _refine_chunk(model: Model, s_p: torch.Tensor, t_p: torch.Tensor, s_l: torch.Tensor,
                  t_l: torch.Tensor, settings: RefineSettings, sim: Similarity, seed: int,
                  bar, start: torch.Tensor | None = None) -> torch.Tensor:
    """The refined parameters of one chunk of pairs: S', T' feed the STN, ``s_l``/``t_l``
    are compared (level by level, on sampled voxels when ``settings.samples``).

    With ``settings.stages`` 'sequential' a cascade is refined stage by stage, as
    classical pipelines do (affine, then deformable): stage k is refined alone for
    ``iterations`` with the stages before it fixed at their refined values and the
    stages after it at the identity (zero parameters), its STN seeing the source warped
    by the stages before it, as in prediction; ``mode`` may name one mode per stage.
    """
    finer = round((t_l.shape[-1] - 1) / max(t_p.shape[-1] - 1, 1))
    if settings.inputs == "local":
        s_l, t_l = local_standardise(s_l), local_standardise(t_l)
    levels = [(level_input(s_l, sigma, finer), level_input(t_l, sigma, finer), steps)
              for sigma, steps in zip(*level_schedule(settings.levels, settings.iterations),
                                      strict=True)]

    def stride(t_k: torch.Tensor) -> int:  # sampling cells of a level: network-grid voxels
        return finer if t_k.shape == t_l.shape else 1

    def run(params_now: Callable[[], torch.Tensor], opt, compose=lambda p: p,
            mapping=model.stn.transform) -> None:
        """Refine level by level; ``compose`` turns what is optimised into the model's
        parameters (a cascade stage's into the whole cascade's); 'lm' maps points with
        the transformation ``mapping`` of what it optimises."""
        for s_k, t_k, steps in levels:
            if isinstance(opt, lm.LevenbergMarquardt):
                points, values = (sample_voxels(t_k, settings.samples, seed, stride(t_k))
                                  if settings.samples else all_voxels(t_k))
                opt.minimise(lambda p, pts=points: mapping.map_points(p, pts),
                             lambda p, pts=points: mapping.map_points_jacobian(p, pts),
                             lambda q, s=s_k, v=values: sample_points(s, q) - v, steps,
                             settings.tolerance, bar)
                continue
            if settings.samples:
                points, values = sample_voxels(t_k, settings.samples, seed, stride(t_k))
                loss = partial(_sampled_losses, model, s_k, points, values, sim)
            else:
                loss = partial(_pair_losses, model, s_k, t_k, sim)
            _optimise(lambda: compose(params_now()), opt, _regularised(model, loss), steps,
                      settings.tolerance, bar)

    x, modes = model.stn_input(s_p, t_p), settings.stage_modes(model)
    if settings.phases(model) == 1:
        params_now, opt = _SETUP[modes[0]](model, model.stn, x, settings.learning_rate, start)
        run(params_now, opt)
        with torch.no_grad():
            return params_now().detach()
    transform = model.transform
    done: list[torch.Tensor] = []
    for k, stage_stn in enumerate(model.stn.stages):
        predicted = transform.split(start)[0] if start is not None and k == 0 else None
        stage_now, opt = _SETUP[modes[k]](model, stage_stn, model.stn.stage_input(x, done),
                                          settings.learning_rate, predicted)
        later = [x.new_zeros(len(x), *s.params_shape) for s in transform.stages[k + 1:]]
        if modes[k] == "lm" and k > 0:
            raise IstnError("config: key 'refine_mode': 'lm' refines only a cascade's first "
                            f"(affine) stage; stage {k + 1} of '{model.transformation}' needs "
                            "'params' or 'weights'")
        # 'lm' differentiates the point map forwards: the first stage's own map, exactly
        # the cascade's while the later stages are at the identity (zero parameters)
        run(stage_now, opt, lambda p, before=tuple(done), after=tuple(later):
            transform.pack([*before, p, *after]), transform.stages[0])
        with torch.no_grad():
            done.append(stage_now().detach())
    return transform.pack(done)


def _regularised(model: Model, loss: Callable[[torch.Tensor], torch.Tensor]
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``loss`` plus the config's ``smoothness`` / ``bending`` penalties of each pair's
    deformation, with the weights training uses: refinement minimises the objective the
    network was trained on (without them a deformable stage is free to fit noise)."""
    cfg, transform = model.cfg, model.transform
    if cfg.smoothness <= 0 and cfg.bending <= 0:
        return loss

    def total(params: torch.Tensor) -> torch.Tensor:
        out = loss(params)
        if cfg.smoothness > 0:
            out = out + cfg.smoothness * transform.regularisation(params, per_pair=True)
        if cfg.bending > 0:
            out = out + cfg.bending * transform.bending(params, per_pair=True)
        return out

    return total


def _pair_losses(model: Model, src: torch.Tensor, trg: torch.Tensor, sim: Similarity,
                 params: torch.Tensor) -> torch.Tensor:
    """``D(W(src), trg)`` of every pair under ``params`` [B]."""
    return refinement_loss(model.stn.grid(params), src, trg, sim)


# Window (voxels per axis) of the local standardisation of refine_inputs 'local'.
LOCAL_WINDOW = 9


def local_standardise(x: torch.Tensor, window: int = LOCAL_WINDOW,
                      floor: float = 0.1) -> torch.Tensor:
    """``(x - mean_w(x)) / max(std_w(x), floor * std(x))`` per image and channel.

    ``mean_w`` / ``std_w`` are over cubic windows of ``window`` voxels (cut at the
    borders). Squared differences of standardised images behave like 1 - LNCC (both
    ignore smooth gain and offset changes such as bias fields) but cost one filtering
    before refinement instead of one per iteration; the floor keeps flat regions
    (background) from amplifying noise. (Statistics taken on a coarser grid and
    interpolated were measured worse on brain MRI: each image's grid has its own
    sub-voxel phase, so source and target would be standardised differently.)
    """
    c = x.shape[1]
    moments = box_mean(torch.cat([x, x * x], 1), window)  # one filtering for both
    mean, mean_sq = moments[:, :c], moments[:, c:]
    std = (mean_sq - mean * mean).clamp_min_(0).sqrt_()
    glob = x.flatten(2).std(2).view(*x.shape[:2], *[1] * (x.dim() - 2))
    return (x - mean).div_(torch.maximum(std, floor * glob).clamp_min_(1e-12))


def sample_voxels(target: torch.Tensor, n: int, seed: int = 0, stride: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` voxels per pair where the target has structure, and the target's values there.

    Voxels are drawn (with replacement, from a generator seeded by ``seed``, so results
    are reproducible) with probability proportional to the target's local standard
    deviation summed over channels (flat background is never drawn). Returns normalised
    points [B, n, dim] (x, y[, z]; ``align_corners=True``) and the values [B, C, n].
    With ``stride`` k > 1 the probabilities are those of every k-th voxel (cells of k
    voxels per axis), and a voxel is drawn uniformly inside the drawn cell (k ** dim
    times cheaper on an image made k times finer, ``refine_resolution``).
    """
    b, c, *shape = target.shape
    dim = len(shape)
    coarse = (target[(..., *[slice(None, None, stride)] * dim)] if stride > 1 else target)
    cshape = coarse.shape[2:]
    std = (box_mean(coarse * coarse, 3) - box_mean(coarse, 3) ** 2).clamp_min(0).sqrt()
    weights = std.sum(1).flatten(1)
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.multinomial(weights.cpu(), n, replacement=True, generator=gen).to(target.device)
    cells = []  # per axis (x first: the fastest axis of the flat index)
    for size in reversed(cshape):
        cells.append(idx % size)
        idx = torch.div(idx, size, rounding_mode="floor")
    if stride > 1:  # a voxel of the cell: offset -k//2 .. k - 1 - k//2 around its corner
        jitter = torch.randint(0, stride, (dim, b, n), generator=gen).to(target.device)
        cells = [(cell * stride + jitter[a] - stride // 2).clamp(0, shape[dim - 1 - a] - 1)
                 for a, cell in enumerate(cells)]
    flat = torch.zeros_like(cells[0])
    for a in reversed(range(dim)):  # z first
        flat = flat * shape[dim - 1 - a] + cells[a]
    values = target.flatten(2).gather(2, flat[:, None, :].expand(b, c, n))
    coords = [cell.to(target.dtype) * (2.0 / max(shape[dim - 1 - a] - 1, 1)) - 1.0
              for a, cell in enumerate(cells)]
    return torch.stack(coords, -1), values


def all_voxels(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every voxel of ``target`` as points and values, in the form of ``sample_voxels``."""
    b, c, *shape = target.shape
    axes = [torch.linspace(-1.0, 1.0, n, dtype=target.dtype, device=target.device)
            for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")  # index order: z, y, x
    points = torch.stack(mesh[::-1], -1).reshape(1, -1, len(shape)).expand(b, -1, -1)
    return points, target.flatten(2)


def _sampled_losses(model: Model, src: torch.Tensor, points: torch.Tensor,
                    values: torch.Tensor, sim: Similarity, params: torch.Tensor
                    ) -> torch.Tensor:
    """``D(S(phi(x)), T(x))`` over the sampled target voxels ``x`` of every pair [B]."""
    warped = sample_points(src, model.stn.transform.map_points(params, points))
    return sim.per_pair(warped, values)


def level_schedule(levels: int, iterations: int) -> tuple[list[float], list[int]]:
    """Blur (Gaussian sigma, voxels) and iterations of each refinement level, coarse first.

    Level k of L blurs with sigma ``2 ** (L - 1 - k)`` voxels, except the last, which
    compares the images as they are (sigma 0): L = 3 gives 4, 2, 0 voxels. The
    iterations are split evenly, the remainder going to the last level.
    """
    sigmas = [float(2 ** (levels - 1 - k)) for k in range(levels - 1)] + [0.0]
    steps = [iterations // levels] * levels
    steps[-1] += iterations - sum(steps)
    return sigmas, steps


def level_input(x: torch.Tensor, sigma: float, finer: int) -> torch.Tensor:
    """A refinement level's input: ``x`` blurred by ``sigma`` network-grid voxels.

    Refinement images ``finer`` times finer than the network grid (``refine_resolution``)
    are taken at every ``finer``-th voxel for the blurred levels (the network grid's own
    points, where a blur of network-grid width loses nothing) and blurred there, which
    costs ``finer ** dim`` times less; the unblurred last level keeps them whole.
    """
    if sigma <= 0:
        return x
    if finer > 1:
        x = x[(..., *[slice(None, None, finer)] * (x.dim() - 2))]
    return gaussian_blur(x, sigma)


def _optimise(params_now: Callable[[], torch.Tensor], opt: torch.optim.Optimizer,
              loss: Callable[[torch.Tensor], torch.Tensor], iterations: int,
              tolerance: float, bar) -> int:
    """Adam steps on the per-pair losses (summed) until done; the number of steps taken."""
    past: list[torch.Tensor] = []
    for it in range(iterations):
        opt.zero_grad(set_to_none=True)
        per_pair = loss(params_now())
        per_pair.sum().backward()
        opt.step()
        bar.update()
        if tolerance > 0:
            past.append(per_pair.detach())
            if len(past) > PATIENCE:
                before = past.pop(0)
                if bool(((before - past[-1]) <= tolerance * before.abs()).all()):
                    bar.update(iterations - it - 1)
                    return it + 1
    return iterations


def _predicted(model, stn, x, start):
    """What ``stn`` predicts for ``x`` (float32): ``start`` where the caller has it."""
    if start is not None:
        return start.float()
    with torch.no_grad(), model.autocast():
        return stn(x).float()


def _setup_params(model, stn, x, lr, start=None):
    """Mode 'params': the parameters ``stn`` predicts for ``x`` are optimised themselves."""
    params = _predicted(model, stn, x, start).clone().requires_grad_(True)
    return (lambda: params), torch.optim.Adam([params], lr=lr)


def _setup_lm(model, stn, x, lr, start=None):
    """Mode 'lm': the predicted parameters, optimised by Levenberg-Marquardt (:mod:`.lm`)."""
    params = _predicted(model, stn, x, start)
    n = params[0].numel()
    if n > lm.MAX_PARAMS:
        raise IstnError(f"config: key 'refine_mode' 'lm' optimises at most {lm.MAX_PARAMS} "
                        f"parameters per pair (an affine), but this stage of "
                        f"'{model.transformation}' has {n}; use 'params' or 'weights' "
                        "(or 'lm+params' with refine_stages 'sequential' for a cascade)")
    opt = lm.LevenbergMarquardt(params)
    return (lambda: opt.params), opt


def _setup_weights(model, stn, x, lr, start=None):
    """Mode 'weights': one copy of ``stn`` per pair, stacked (see :mod:`.per_pair`)."""
    per_pair = per_pair_stn(stn, len(x))
    if per_pair is None:  # a layer without a batched form: one vmapped copy per pair
        return _setup_weights_vmap(model, stn, x, lr)
    return (lambda: per_pair(x)), _adam(list(per_pair.parameters()), lr)


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel where the device has one (one pass, not ~10 per tensor)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # no fused Adam for this device or dtype
        return torch.optim.Adam(params, lr=lr)


def _setup_weights_vmap(model, stn, x, lr, start=None):
    """General form of ``_setup_weights``: one copy of ``stn`` per pair under ``vmap``."""
    weights, buffers = stack_module_state([copy.deepcopy(stn) for _ in range(len(x))])
    weights = {k: v.detach().requires_grad_(True) for k, v in weights.items()}
    x = x.unsqueeze(1)  # [N, 1, 2C, *shape]: one pair per copy

    def one(w, b, xi):
        return functional_call(stn, (w, b), (xi,))

    batched = vmap(one)
    return (lambda: batched(weights, buffers, x).squeeze(1)), _adam(list(weights.values()), lr)


_SETUP = {"params": _setup_params, "weights": _setup_weights, "lm": _setup_lm}

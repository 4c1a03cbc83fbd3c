"""Prediction, test-time refinement and evaluation of pairs.

Refinement minimises ``MSE(W(S'), T')`` per pair with the ITN frozen (its outputs
are computed once). All pairs of a chunk are refined together in one batch, each
with its own copy of what is optimised: the STN's weights (``refine_mode
'weights'``, as published; copies stacked and run as grouped convolutions and
batched products, see ``_per_pair_stn``) or the transformation parameters
(``'params'``). Adam is element-wise, so summing the per-pair losses gives every
pair exactly its own optimisation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from ..data import PairSet
from ..losses import refinement_loss
from ..metrics import landmark_centroids, landmark_error, overlap_metrics
from ..spatial import index_to_normalised, normalised_to_index, warp
from .model import Model

# Upper bound on stacked STN weights (+ Adam state) refined at once in 'weights' mode.
_MAX_STACKED_ELEMENTS = 60_000_000


@torch.no_grad()
def predict(model: Model, src: torch.Tensor, trg: torch.Tensor, batch_size: int = 16
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(params, S', T') for all pairs, in batches, without gradients."""
    model.train(False)
    out_p, out_s, out_t = [], [], []
    for i in range(0, len(src), batch_size):
        s_p, t_p = model.primes(src[i:i + batch_size], trg[i:i + batch_size])
        out_p.append(model.params(s_p, t_p))
        out_s.append(s_p)
        out_t.append(t_p)
    return torch.cat(out_p), torch.cat(out_s), torch.cat(out_t)


def refine(model: Model, src_prime: torch.Tensor, trg_prime: torch.Tensor, iterations: int,
           lr: float, mode: str = "weights", chunk: int = 0, progress: bool = True
           ) -> torch.Tensor:
    """Refined transformation parameters for every pair (the ITN outputs are fixed)."""
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
            out.append(fn(model, s_p, t_p, iterations, lr, bar))
    finally:
        bar.close()
        if flush:
            torch.set_flush_denormal(False)  # leave the process as found
    return torch.cat(out)


def _refine_params(model, s_p, t_p, iterations, lr, bar) -> torch.Tensor:
    with torch.no_grad():
        params = model.params(s_p, t_p)
    params = params.clone().requires_grad_(True)
    opt = torch.optim.Adam([params], lr=lr)
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        refinement_loss(model.stn.grid(params), s_p, t_p).sum().backward()
        opt.step()
        bar.update()
    return params.detach()


def _refine_weights(model, s_p, t_p, iterations, lr, bar) -> torch.Tensor:
    stn = model.stn
    x = model.stn_input(s_p, t_p)
    per_pair = _per_pair_stn(stn, len(s_p))
    if per_pair is None:  # a layer without a batched form: one vmapped copy per pair
        return _refine_weights_vmap(model, s_p, t_p, iterations, lr, bar)
    weights = list(per_pair.parameters())
    opt = _adam(weights, lr)
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        refinement_loss(stn.grid(per_pair(x)), s_p, t_p).sum().backward()
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


# Parameter-free layers that act on every channel of every sample separately: they run
# unchanged on pairs packed into channels ([1, n*C, *spatial]).
_CHANNELWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Identity,
                nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _per_pair_stn(stn: nn.Module, n: int) -> nn.Module | None:
    """A copy of ``stn`` that gives each of ``n`` pairs (batch elements) its own weights.

    Every Conv/Linear holds ``n`` stacked copies of its weights and applies copy ``i``
    to pair ``i`` (grouped convolution, batched matrix product); parameter-free layers
    are kept, as the STN treats batch elements independently. Sequences of convolutions
    and channel-wise layers run on the pairs packed into channels, so no layout changes
    happen between them. None when a layer has no such form (e.g. batch norm).
    """
    return _per_pair(copy.deepcopy(stn), n)


def _per_pair(module: nn.Module, n: int) -> nn.Module | None:
    if isinstance(module, nn.Sequential) and _packable(module):
        return _Packed([_PairConv(m, n) if _plain_conv(m) else m for m in module], n)
    if isinstance(module, _CONVS):
        return _Packed([_PairConv(module, n)], n) if _plain_conv(module) else None
    if type(module) is nn.Linear:
        return _PairLinear(module, n)
    if (isinstance(module, nn.modules.batchnorm._BatchNorm)
            or next(module.parameters(recurse=False), None) is not None):
        return None  # batch statistics or weights of an unknown layer
    for name, child in module.named_children():
        new = _per_pair(child, n)
        if new is None:
            return None
        setattr(module, name, new)
    return module


def _plain_conv(m: nn.Module) -> bool:
    return type(m) in _CONVS and m.padding_mode == "zeros"


def _packable(seq: nn.Sequential) -> bool:
    """Convolutions and channel-wise layers, optionally ending with a full Flatten."""
    layers = list(seq)
    if layers and isinstance(layers[-1], nn.Flatten):
        if (layers[-1].start_dim, layers[-1].end_dim) != (1, -1):
            return False
        layers = layers[:-1]
    return (any(isinstance(m, _CONVS) for m in layers)
            and all(_plain_conv(m) or isinstance(m, _CHANNELWISE) for m in layers))


class _Packed(nn.Module):
    """Runs layers on ``n`` pairs packed into channels: [n, C, ...] -> [1, n*C, ...] -> back.

    Pairs stay outermost in the channel order, so unpacking is a reshape, also after a
    Flatten ([1, n*F] -> [n, F]).
    """

    def __init__(self, layers: list[nn.Module], n: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.n = n
        self._last: tuple[torch.Tensor, tuple[int, int], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._pack(x)
        after_conv = False
        for layer in self.layers:
            # a convolution keeps no output for its backward: ReLU may overwrite it
            y = torch.relu_(y) if after_conv and type(layer) is nn.ReLU else layer(y)
            after_conv = isinstance(layer, _PairConv)
        return y.reshape(self.n, y.shape[1] // self.n, *y.shape[2:])

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        # Refinement feeds the same fixed input every iteration: pack it once.
        last = self._last
        if last is not None and last[0] is x and last[1] == (x._version, last[2]._version):
            return last[2]
        y = x.reshape(1, -1, *x.shape[2:])
        first = self.layers[0]
        fmt = _channels_last(first.weight) if isinstance(first, _PairConv) else None
        if fmt is not None:
            # The grouped convolution's layout, with canonical strides: a permuted view
            # (odd stride on the size-1 batch axis) gave wrong float64 weight gradients.
            y = y.contiguous(memory_format=fmt)
        if not x.requires_grad:
            self._last = (x, (x._version, y._version), y)
        return y


def _channels_last(t: torch.Tensor) -> torch.memory_format | None:
    """The channels-last format ``t`` is in, if any."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if fmt is not None and not t.is_contiguous() and t.is_contiguous(memory_format=fmt):
        return fmt
    return None


class _PairConv(nn.Module):
    """``n`` copies of a convolution as one grouped convolution on packed pairs."""

    def __init__(self, conv: nn.Module, n: int):
        super().__init__()
        w = conv.weight.detach()
        self.weight = nn.Parameter(torch.cat([w] * n))  # keeps w's memory format
        self.bias = (nn.Parameter(conv.bias.detach().repeat(n)) if conv.bias is not None
                     else None)
        self.args = (conv.stride, conv.padding, conv.dilation, n * conv.groups)
        self.conv = (F.conv1d, F.conv2d, F.conv3d)[w.dim() - 3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.weight, self.bias, *self.args)


class _PairLinear(nn.Module):
    """``n`` copies of a linear layer; copy ``i`` maps pair ``i`` ([n, ..., in])."""

    def __init__(self, linear: nn.Linear, n: int):
        super().__init__()
        # Stored transposed, [n, in, out]: x @ W is then one batched product whose
        # weight gradient comes out in the weight's own layout.
        self.weight = nn.Parameter(linear.weight.detach().t().expand(n, -1, -1).contiguous())
        self.bias = (nn.Parameter(linear.bias.detach().expand(n, 1, -1).contiguous())
                     if linear.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(len(self.weight), -1, x.shape[-1])  # [n, m, in]
        y = (torch.bmm(h, self.weight) if self.bias is None
             else torch.baddbmm(self.bias, h, self.weight))
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _refine_weights_vmap(model, s_p, t_p, iterations, lr, bar) -> torch.Tensor:
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
        refinement_loss(stn.grid(params_now()), s_p, t_p).sum().backward()
        opt.step()
        bar.update()
    with torch.no_grad():
        return params_now()


@dataclass
class Warped:
    """Warped source images of all pairs for one set of parameters."""

    params: torch.Tensor
    src: torch.Tensor
    seg: torch.Tensor | None
    src_prime: torch.Tensor | None


@torch.no_grad()
def apply(model: Model, params: torch.Tensor, ps: PairSet, src_prime: torch.Tensor | None,
          batch_size: int = 16) -> Warped:
    """Warp source, source SoI and S' of every pair with ``params``."""
    dev = params.device
    outs: dict[str, list[torch.Tensor]] = {"src": [], "seg": [], "prime": []}
    for i in range(0, len(ps), batch_size):
        grid = model.stn.grid(params[i:i + batch_size])
        outs["src"].append(warp(ps.src[i:i + batch_size].to(dev), grid).cpu())
        if ps.src_seg is not None:
            outs["seg"].append(warp(ps.src_seg[i:i + batch_size].to(dev), grid).cpu())
        if src_prime is not None:
            outs["prime"].append(warp(src_prime[i:i + batch_size], grid).cpu())
    cat = lambda k: torch.cat(outs[k]) if outs[k] else None  # noqa: E731
    return Warped(params.cpu(), cat("src"), cat("seg"), cat("prime"))


def pair_metrics(model: Model, ps: PairSet, params: torch.Tensor | None,
                 warped_seg: torch.Tensor | None) -> list[dict[str, float | None]]:
    """Per-pair metrics; ``params=None`` evaluates the identity (no registration).

    Overlap: warped source SoI vs target SoI, binarised at 0.5, physical spacing.
    landmark_error: centroids of the source landmark blobs mapped to the target by the
    inverse of the sampling map, matched one-to-one (Hungarian, minimum total distance)
    to the target's centroids; mean physical distance. With point CSVs (physical x,y[,z],
    rows corresponding) the listed points are used row by row, unmatched.
    landmark_error_gt: the same
    source centroids mapped by the predicted and by the ground-truth transform.
    """
    spacing = np.asarray(model.cfg.spacing, dtype=float)
    rows = []
    for i in range(len(ps)):
        row: dict[str, float | None] = {}
        if ps.src_seg is not None and ps.trg_seg is not None:
            pred = ps.src_seg[i, 0] if params is None else warped_seg[i, 0]
            row.update(overlap_metrics(pred.numpy(), ps.trg_seg[i, 0].numpy(), spacing))
        paired = ps.src_landmarks is not None
        if ps.src_pts is not None or paired:
            src_c = (ps.src_landmarks[i] if paired
                     else landmark_centroids(ps.src_pts[i, 0].numpy()))
            mapped = src_c if params is None else map_source_points(model, params[i], src_c)
            if paired:
                row["landmark_error"] = landmark_error(mapped, ps.trg_landmarks[i], spacing,
                                                       match=False)
            elif ps.trg_pts is not None:
                trg_c = landmark_centroids(ps.trg_pts[i, 0].numpy())
                row["landmark_error"] = landmark_error(mapped, trg_c, spacing)
            if ps.transforms is not None:
                truth = true_source_to_target(ps, i, src_c)
                row["landmark_error_gt"] = landmark_error(mapped, truth, spacing, match=False)
        rows.append(row)
    return rows


def map_source_points(model: Model, params: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """Source-grid voxel indices (x, y[, z]) -> target-grid indices under ``params``."""
    if len(points) == 0:
        return points
    shape = model.cfg.shape
    p = index_to_normalised(torch.as_tensor(points, dtype=torch.float32)[None], shape)
    with torch.no_grad():
        q = model.stn.transform.inverse_map_points(params[None].float().cpu(), p)
    return normalised_to_index(q, shape)[0].numpy()


def true_source_to_target(ps: PairSet, i: int, points: np.ndarray) -> np.ndarray:
    """Map source-grid indices to target-grid indices with the ground-truth transforms.

    Transform files map file voxel indices to the template (``image(p) = template(T p)``),
    so a source point moves to the target by ``inv(T_t) @ T_s`` in file indices.
    """
    t_s, t_t = ps.transforms[i]
    dim = points.shape[1]
    phys = ps.src_grid[i].to_physical(points)
    idx = ps.src_file[i].to_index(phys)
    hom = np.zeros((len(idx), 4))
    hom[:, :dim] = idx
    hom[:, 3] = 1.0
    moved = (np.linalg.inv(t_t) @ t_s @ hom.T).T[:, :dim]
    return ps.trg_grid[i].to_index(ps.trg_file[i].to_physical(moved))


def evaluate(model: Model, ps: PairSet, device: torch.device, refine_iters: int = 0,
             batch_size: int = 16, progress: bool = True) -> dict:
    """Predict (and refine) every pair; metrics for identity, before and after refinement.

    Returns a dict with per-pair metric rows under 'identity', 'before_refinement',
    'after_refinement' (None when not refined), the Warped results and S', T'.
    """
    src, trg = ps.src.to(device), ps.trg.to(device)
    params, s_p, t_p = predict(model, src, trg, batch_size)
    itn_out = s_p if model.itn is not None else None
    before = apply(model, params, ps, itn_out, batch_size)
    result = {
        "identity": pair_metrics(model, ps, None, None),
        "before_refinement": pair_metrics(model, ps, before.params, before.seg),
        "after_refinement": None,
        "warped": before, "warped_refined": None,
        "src_prime": s_p.cpu() if itn_out is not None else None,
        "trg_prime": t_p.cpu() if itn_out is not None else None,
    }
    if refine_iters > 0:
        cfg = model.cfg
        lr = cfg.refine_learning_rate or cfg.learning_rate
        refined = refine(model, s_p, t_p, refine_iters, lr, cfg.refine_mode, cfg.refine_batch,
                         progress)
        after = apply(model, refined, ps, itn_out, batch_size)
        result["after_refinement"] = pair_metrics(model, ps, after.params, after.seg)
        result["warped_refined"] = after
    return result

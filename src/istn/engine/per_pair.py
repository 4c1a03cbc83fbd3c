"""An STN with one copy of its weights per pair, for refining many pairs in one batch.

Refinement in the published ``weights`` mode fine-tunes a copy of the STN per pair.
Stacking the copies turns every convolution into one grouped convolution and every
linear layer into one batched matrix product, so all pairs of a chunk run together
(tested equal to refining each pair alone).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

# Parameter-free layers that act on every channel of every sample separately: they run
# unchanged on pairs packed into channels ([1, n*C, *spatial]).
_CHANNELWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Identity,
                nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def per_pair_stn(stn: nn.Module, n: int) -> nn.Module | None:
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

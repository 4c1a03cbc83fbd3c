"""Image transformer network: a small U-Net mapping an image to a structure-like map."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import conv, conv_transpose


class ITN(nn.Module):
    """The published ITN (2D or 3D). Output has the input's size; ``out_channels``
    channels (default the input's ``channels``, as published; a multi-label SoI: one
    per structure).

    ReLU follows every 3x3 conv except the last; down-sampling convs (k2 s2) and
    transposed convs are linear; skip connections are additions. Channels
    in→2→4 | 8 | 16 | 8 | 4→2→2 → out. Spatial size must be divisible by 4.
    """

    # The convolutions whose output goes through a ReLU (for dead-layer checks).
    RELU_LAYERS = ("l1a", "l1b", "l2", "l3", "u2", "u1a", "u1b")

    def __init__(self, dim: int = 2, channels: int = 1, out_channels: int | None = None):
        super().__init__()
        self.dim = dim
        c3 = dict(kernel_size=3, padding=1)
        self.l1a = conv(dim, channels, 2, **c3)
        self.l1b = conv(dim, 2, 4, **c3)
        self.down1 = conv(dim, 4, 8, kernel_size=2, stride=2)
        self.l2 = conv(dim, 8, 8, **c3)
        self.down2 = conv(dim, 8, 16, kernel_size=2, stride=2)
        self.l3 = conv(dim, 16, 16, **c3)
        self.up2 = conv_transpose(dim, 16, 8, kernel_size=2, stride=2)
        self.u2 = conv(dim, 8, 8, **c3)
        self.up1 = conv_transpose(dim, 8, 4, kernel_size=2, stride=2)
        self.u1a = conv(dim, 4, 2, **c3)
        self.u1b = conv(dim, 2, 2, **c3)
        self.out = conv(dim, 2, channels if out_channels is None else out_channels, **c3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = F.relu(self.l1b(F.relu(self.l1a(x))))
        f2 = F.relu(self.l2(self.down1(f1)))
        f3 = F.relu(self.l3(self.down2(f2)))
        u2 = F.relu(self.u2(self.up2(f3) + f2))
        u1 = F.relu(self.u1b(F.relu(self.u1a(self.up1(u2) + f1))))
        return self.out(u1)

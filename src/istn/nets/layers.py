"""Dimension-generic layer constructors."""

import torch.nn as nn


def conv(dim: int, *args, **kwargs) -> nn.Module:
    return (nn.Conv2d if dim == 2 else nn.Conv3d)(*args, **kwargs)


def conv_transpose(dim: int, *args, **kwargs) -> nn.Module:
    return (nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d)(*args, **kwargs)


def avg_pool(dim: int, *args, **kwargs) -> nn.Module:
    return (nn.AvgPool2d if dim == 2 else nn.AvgPool3d)(*args, **kwargs)

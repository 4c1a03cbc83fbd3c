"""The registration model: ITN + STN + strategy, one ``nn.Module``.

``Model(batch)`` returns the strategy's training loss and its named terms, so that
training (and DistributedDataParallel) wraps the model itself. Checkpoints are read
and written by :mod:`.checkpoint`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from .._version import __version__
from ..config import Config
from ..losses import check_strategy, training_loss, uses_itn
from ..nets import ITN, STN
from ..similarity import new_similarity
from ..spatial import Transformation

# Config keys that define the network or its input data: a model only fits data
# prepared with the same values.
NETWORK_KEYS = ("size", "spacing", "normalizer_img", "normalizer_seg", "grid_orientation",
                "grid_centre", "labels", "soi_components", "stn_keypoints")

Scaling = dict[str, list[float]]


class Model(nn.Module):
    """A trained or training ISTN: config, strategy, transformation and networks.

    ``amp``: bf16 autocast for the networks' forward passes (a runtime option, not
    saved); their outputs are cast back to float32, so the transformation, warping,
    losses and metrics stay in float32.

    ``scaling`` (config 'network_scaling' 'auto', set when training starts and saved in
    checkpoints): ``{"image": [mean, std], "seg": [mean, std]}`` of the training data,
    held as buffers. The networks then see standardised values: the ITN maps
    standardised images to standardised SoI, mapped back to SoI units, and the STN
    sees standardised inputs. Adam's fixed step size then acts on weights and biases
    alike whatever the data's units (raw 0..255 PNGs let the biases move by a tiny
    fraction of the activations). None: raw values, as published.
    """

    def __init__(self, cfg: Config, strategy: str, transformation: str, amp: bool = False):
        super().__init__()
        check_strategy(strategy)
        self.cfg, self.strategy, self.transformation, self.amp = (cfg, strategy,
                                                                  transformation, amp)
        # built ITN first (the published order of random initialisation), registered STN
        # first (the published order of parameters)
        # one ITN output channel per SoI structure; the STN sees S', T' (C channels each)
        # for ISTN-e/-i, the images (one channel each) for STN-u/-s
        c = cfg.soi_channels
        itn = ITN(cfg.dim, 1, c) if uses_itn(strategy) else None
        self.stn = STN(transformation, cfg.shape, c if itn is not None else 1,
                       keypoints=cfg.stn_keypoints, **cfg.stn_options(transformation))
        self.itn = itn
        self.similarity = new_similarity(cfg.similarity)
        # the terms that compare with a SoI (None: the published MSE / 'similarity')
        self.soi_similarity = new_similarity(cfg.soi_loss) if cfg.soi_loss else None
        self.register_buffer("_scaling", torch.zeros(2, 2, dtype=torch.float64),
                             persistent=False)
        self._scaled = False
        # Channels-last weights: on the CPU, convolution backward with these very small
        # channel counts is several times faster in this layout (same results).
        self.to(memory_format=torch.channels_last if cfg.dim == 2 else torch.channels_last_3d)

    @classmethod
    def build(cls, cfg: Config, strategy: str, transformation: str, amp: bool = False) -> Model:
        return cls(cfg, strategy, transformation, amp)

    @property
    def transform(self) -> Transformation:
        """The transformation model (parameters -> sampling grid, points, export)."""
        return self.stn.transform

    @property
    def scaling(self) -> Scaling | None:
        if not self._scaled:
            return None
        s = self._scaling.tolist()
        return {"image": s[0], "seg": s[1]}

    @scaling.setter
    def scaling(self, value: Scaling | None) -> None:
        self._scaled = value is not None
        if value is not None:
            self._scaling.copy_(torch.tensor([value["image"], value["seg"]],
                                             dtype=torch.float64))

    def _stats(self, kind: str) -> tuple[float, float]:
        mean, std = self._scaling[0 if kind == "image" else 1].tolist()
        return mean, std

    def autocast(self) -> torch.autocast:
        """bf16 autocast on the networks' device when ``amp`` is set (else a no-op)."""
        device = next(self.stn.parameters()).device
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp)

    def primes(self, src: torch.Tensor, trg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S', T'): ITN outputs for ISTN-e/-i, the images themselves otherwise."""
        if self.itn is None:
            return src, trg
        x = torch.cat([src, trg], dim=0)
        if self._scaled:
            mean, std = self._stats("image")
            x = (x - mean) / std
        with self.autocast():
            both = self.itn(x).float()
        if self._scaled:
            mean, std = self._stats("seg")
            both = both * std + mean
        return both[: len(src)], both[len(src):]

    def stn_input(self, src_prime: torch.Tensor, trg_prime: torch.Tensor) -> torch.Tensor:
        """The STN's input [B, 2C, ...]: (S', T') stacked, standardised when scaling is set."""
        x = torch.cat([src_prime, trg_prime], dim=1)
        if self._scaled:
            # S', T' are in SoI units for ISTN-e/-i, the images themselves for STN-u/-s
            mean, std = self._stats("seg" if self.itn is not None else "image")
            x = (x - mean) / std
        return x

    def params(self, src_prime: torch.Tensor, trg_prime: torch.Tensor) -> torch.Tensor:
        """The STN's transformation parameters for the pairs (S', T') (float32)."""
        x = self.stn_input(src_prime, trg_prime)
        with self.autocast():
            return self.stn(x).float()

    def forward(self, b: dict[str, torch.Tensor | None]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The strategy's loss of one batch (``src, trg, src_seg, trg_seg``) and its terms.

        With config ``smoothness`` / ``bending`` > 0 the transformation's diffusion /
        bending-energy penalty is added with that weight.
        """
        s_p, t_p = self.primes(b["src"], b["trg"])
        params = self.params(s_p, t_p)
        grid = self.stn.grid(params)
        loss, terms = training_loss(self.strategy, grid, b["src"], b["trg"], s_p, t_p,
                                    b["src_seg"], b["trg_seg"], self.similarity,
                                    self.soi_similarity)
        if self.cfg.smoothness > 0:
            terms["smoothness"] = self.transform.regularisation(params)
            loss = loss + self.cfg.smoothness * terms["smoothness"]
        if self.cfg.bending > 0:
            terms["bending"] = self.transform.bending(params)
            loss = loss + self.cfg.bending * terms["bending"]
        return loss, terms

    def meta(self) -> dict[str, Any]:
        return {"format": "istn-checkpoint", "istn_version": __version__,
                "strategy": self.strategy, "transformation": self.transformation,
                "dim": self.cfg.dim, "size": self.cfg.size, "spacing": self.cfg.spacing,
                "config": self.cfg.to_dict(), "scaling": self.scaling}


def scaling_from(src: torch.Tensor, trg: torch.Tensor, src_seg: torch.Tensor | None,
                 trg_seg: torch.Tensor | None) -> Scaling:
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

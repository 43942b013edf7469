"""Restoration network (FAIR ``model_unetskip`` / DRAEM reconstructive sub-network) from MONAI blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv
from monai.networks.nets.basic_unet import TwoConv

from networks.blocks import Encoder, UpConv, check_divisible

__all__ = ["RestorationNet"]


class _RestorationUp(nn.Module):
    """One decoder level of :class:`RestorationNet`: ``UpConv``, optional additive skip, ``TwoConv``."""

    def __init__(
        self, spatial_dims: int, in_chns: int, out_chns: int, act: str | tuple, norm: str | tuple, additive_skip: bool
    ) -> None:
        super().__init__()
        self.additive_skip = additive_skip
        self.upsample = UpConv(spatial_dims, in_chns, out_chns, act, norm)
        self.convs = TwoConv(spatial_dims, out_chns, out_chns, act, norm, True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x)
        if self.additive_skip:
            x = x + skip
        return self.convs(x)


class RestorationNet(nn.Module):
    """Encoder-decoder that restores a clean image from a (high-pass filtered, anomalous) input.

    ``additive_skips=True`` is FAIR's ``model_unetskip`` (decoder level ``i`` adds encoder level ``i``);
    ``additive_skips=False`` is DRAEM's reconstructive sub-network (no skips). Widths come from ``features``
    (finest first): the encoder has one level per width; the decoder mirrors it, each level upsampling x2 and
    convolving to the next shallower width, adding the encoder feature of that level when ``additive_skips``, then a
    ``TwoConv``; a final 3x3 convolution (no activation, as DRAEM/FAIR ``fin_out``) maps to ``out_channels``.
    FAIR/DRAEM widths are ``(128, 256, 512, 1024, 1024)``; unlike FAIR's hand-written decoder, the width change
    happens in the upsampling convolution rather than in the block's last convolution.

    Input: ``(B, in_channels, H, W)`` float, H and W divisible by ``2 ** (len(features) - 1)``.
    Output: ``(B, out_channels, H, W)`` float, unbounded (no final activation; the target is an image in [0, 1]).

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: number of input channels.
        out_channels: number of output channels.
        features: width of every level, finest first (at least 2 levels).
        additive_skips: add encoder features in the decoder (FAIR) or not (DRAEM).
        act: activation type and arguments.
        norm: normalization type and arguments.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (16, 32, 64, 128, 128),
        additive_skips: bool = True,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) < 2:
            raise ValueError(f"features needs at least 2 levels, got {features}.")
        self.features = features
        self.divisor = 2 ** (len(features) - 1)
        self.encoder = Encoder(spatial_dims, in_channels, features, act, norm)
        self.decoder = nn.ModuleList(
            [
                _RestorationUp(spatial_dims, features[i + 1], features[i], act, norm, additive_skips)
                for i in reversed(range(len(features) - 1))
            ]
        )
        self.final_conv = Conv["conv", spatial_dims](features[0], out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restore ``x`` of shape ``(B, in_channels, H, W)``; returns ``(B, out_channels, H, W)``."""
        check_divisible(x, self.divisor)
        skips = self.encoder(x)
        x = skips[-1]
        for i, block in enumerate(self.decoder):
            x = block(x, skips[-(i + 2)])
        return self.final_conv(x)

"""The building blocks both sub-networks share, from MONAI's own: the U-Net encoder, the upsample-and-convolve step
of a decoder level, and the input-size check (:mod:`networks.restoration`, :mod:`networks.skip_decay_unet`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, UpSample
from monai.networks.nets.basic_unet import Down, TwoConv

__all__ = ["Encoder", "UpConv", "check_divisible"]


class Encoder(nn.Module):
    """U-Net encoder: ``TwoConv`` at full resolution, then one ``Down`` (max-pool + ``TwoConv``) per further width.

    Input ``(B, in_channels, *spatial)``; output a list of ``len(features)`` feature maps, level ``i`` of shape
    ``(B, features[i], *spatial / 2**i)`` (finest first).

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: number of input channels.
        features: width of every level, finest first.
        act: activation type and arguments.
        norm: normalization type and arguments.
        bias: whether the convolutions have a bias term.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        features: Sequence[int],
        act: str | tuple,
        norm: str | tuple,
        bias: bool = True,
    ) -> None:
        super().__init__()
        blocks = [TwoConv(spatial_dims, in_channels, features[0], act, norm, bias)]
        for i in range(1, len(features)):
            blocks.append(Down(spatial_dims, features[i - 1], features[i], act, norm, bias))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the feature map of every level, finest first."""
        features: list[torch.Tensor] = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features


class UpConv(nn.Sequential):
    """Upsample x2 (bi/trilinear, ``align_corners=True``, as DRAEM/FAIR) then conv-norm-act to ``out_chns``.

    Input ``(B, in_chns, *spatial)``; output ``(B, out_chns, *spatial * 2)``.

    Args:
        spatial_dims: number of spatial dimensions.
        in_chns: number of input channels.
        out_chns: number of output channels.
        act: activation type and arguments.
        norm: normalization type and arguments.
        bias: whether the convolution has a bias term.
    """

    def __init__(
        self, spatial_dims: int, in_chns: int, out_chns: int, act: str | tuple, norm: str | tuple, bias: bool = True
    ) -> None:
        super().__init__()
        self.add_module(
            "upsample",
            UpSample(spatial_dims, scale_factor=2, mode="nontrainable", pre_conv=None, interp_mode="linear"),
        )
        self.add_module("conv", Convolution(spatial_dims, in_chns, out_chns, act=act, norm=norm, bias=bias, padding=1))


def check_divisible(x: torch.Tensor, divisor: int) -> None:
    """Raise ``ValueError`` unless every spatial size of ``x`` (B, C, *spatial) is divisible by ``divisor``."""
    if torch.jit.is_tracing():  # a traced graph fixes the input size anyway
        return
    for size in x.shape[2:]:
        if size % divisor != 0:
            raise ValueError(
                f"spatial size {list(x.shape[2:])} must be divisible by {divisor} (2 ** (number of levels - 1)); "
                "pad or resize the input (e.g. monai.transforms.DivisiblePad)."
            )

"""Segmentation U-Net whose skip connections fade out (WDMT-Net ``UNet_cut``), built from MONAI blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv
from monai.networks.nets.basic_unet import TwoConv

from networks.blocks import Encoder, UpConv, check_divisible

__all__ = ["SkipDecayUp", "SkipDecayUNet"]


class SkipDecayUp(nn.Module):
    """One decoder level with a decaying skip: ``TwoConv(cat(alpha * E + (1 - alpha) * D, D))``.

    ``D = UpConv(x)`` is the upsampled decoder feature, convolved to the encoder width; ``E`` the encoder feature.
    With ``alpha = 1`` the block sees ``cat(E, D)``, a plain concat U-Net (encoder first, as MONAI's ``UpCat``);
    with ``alpha = 0`` the skip carries only decoder information. ``detach_decoder_copy`` detaches the second copy
    of ``D`` as WDMT's code does (the mixed copy keeps its gradient).

    Input ``x (B, in_chns, *s)``, ``skip (B, out_chns, *2s)``, ``alpha`` a scalar tensor; output ``(B, out_chns, *2s)``.

    Args:
        spatial_dims: number of spatial dimensions.
        in_chns: number of channels of the decoder input.
        out_chns: number of channels of the encoder feature (and of the output).
        act: activation type and arguments.
        norm: normalization type and arguments.
        detach_decoder_copy: detach the concatenated copy of ``D`` (WDMT).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_chns: int,
        out_chns: int,
        act: str | tuple,
        norm: str | tuple,
        detach_decoder_copy: bool = False,
    ) -> None:
        super().__init__()
        self.detach_decoder_copy = detach_decoder_copy
        self.upsample = UpConv(spatial_dims, in_chns, out_chns, act, norm)
        self.convs = TwoConv(spatial_dims, 2 * out_chns, out_chns, act, norm, True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Upsample ``x``, mix it into ``skip`` with weight ``alpha`` and convolve the concatenation."""
        decoded = self.upsample(x)
        mixed = alpha * skip + (1.0 - alpha) * decoded
        copy = decoded.detach() if self.detach_decoder_copy else decoded
        return self.convs(torch.cat([mixed, copy], dim=1))


class SkipDecayUNet(nn.Module):
    """U-Net with ``len(features)`` levels whose skip connections are faded out by ``alpha`` (WDMT-Net).

    At decoder level ``i``: ``D_i`` = upsample(decoder) convolved to the encoder width ``E_i``;
    ``M_i = alpha * E_i + (1 - alpha) * D_i``; the level's ``TwoConv(2c -> c)`` sees ``cat(M_i, D_i)``.
    ``alpha`` is a registered buffer (saved in ``state_dict``, default 1.0 = plain concat U-Net), set from outside
    by the training loop with :meth:`set_alpha` (WDMT: 1 -> 0 linearly). DRAEM's discriminative widths are
    ``(64, 128, 256, 512, 512, 512)``. A final 3x3 convolution (no activation, as DRAEM) gives the logits.

    Input: ``(B, in_channels, H, W)`` float (the detector feeds ``cat(restored, image)``), H and W divisible by
    ``2 ** (len(features) - 1)``.
    Output: ``(B, out_channels, H, W)`` float logits (softmax over channels gives class probabilities).

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: number of input channels.
        out_channels: number of output channels (classes).
        features: width of every level, finest first (at least 2 levels).
        detach_decoder_copy: detach the concatenated copy of ``D_i`` (WDMT's code).
        act: activation type and arguments.
        norm: normalization type and arguments.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 2,
        out_channels: int = 2,
        features: Sequence[int] = (16, 32, 64, 128, 128, 128),
        detach_decoder_copy: bool = False,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) < 2:
            raise ValueError(f"features needs at least 2 levels, got {features}.")
        self.features = features
        self.divisor = 2 ** (len(features) - 1)
        self.register_buffer("alpha", torch.tensor(1.0))
        self.encoder = Encoder(spatial_dims, in_channels, features, act, norm)
        self.decoder = nn.ModuleList(
            [
                SkipDecayUp(spatial_dims, features[i + 1], features[i], act, norm, detach_decoder_copy)
                for i in reversed(range(len(features) - 1))
            ]
        )
        self.final_conv = Conv["conv", spatial_dims](features[0], out_channels, kernel_size=3, padding=1)

    @torch.jit.unused
    def set_alpha(self, value: float) -> None:
        """Set the skip weight ``alpha`` in [0, 1] (1: full encoder skips, 0: skips carry decoder features only)."""
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {value}.")
        self.alpha.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment ``x`` of shape ``(B, in_channels, H, W)``; returns logits ``(B, out_channels, H, W)``."""
        check_divisible(x, self.divisor)
        skips = self.encoder(x)
        # alpha lives in float32; match the activations' dtype (e.g. under autocast)
        alpha = self.alpha.to(skips[0].dtype)
        x = skips[-1]
        for i, block in enumerate(self.decoder):
            x = block(x, skips[-(i + 2)], alpha)
        return self.final_conv(x)

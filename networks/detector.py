"""The joint model: Butterworth high-pass -> restoration net -> skip-decay segmentation U-Net."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from networks.frequency import ButterworthHighPass
from networks.restoration import RestorationNet
from networks.scoring import anomaly_map_from_logits, msgms_map
from networks.skip_decay_unet import SkipDecayUNet

__all__ = ["FrequencyAwareDetector"]

OUTPUT_MODES = ("both", "anomaly_map")


class FrequencyAwareDetector(nn.Module):
    """Frequency-aware restoration + segmentation anomaly detector for 2D slices.

    ``x_in = highpass(image) if use_highpass else image``; ``restored = restoration(x_in)``;
    ``logits = segmentation(cat(restored, image))`` (DRAEM's order: restored first). The restoration is not detached
    in training (DRAEM trains both nets end to end); at inference, gradients are off anyway.

    Ablations: ``restoration_features=None`` gives a segmentation-only model (paper's WD ablation: the segmentation
    input is the image alone, ``restored`` is None, the high-pass is unused); ``segmentation_features=None`` gives a
    restoration-only model (RE-MS / FAIR: ``logits`` is None and the anomaly map is MS-GMS(image, restored)).

    Input: ``image`` ``(B, in_channels, H, W)`` float in [0, 1]; H and W divisible by ``2 ** (levels - 1)`` of both
    nets.
    Output, ``output="both"`` (training): tuple ``(restored (B, in_channels, H, W) float unbounded or None,
    logits (B, 2, H, W) float or None)``.
    Output, ``output="anomaly_map"`` (inference, one tensor): ``(B, 1, H, W)`` float in [0, 1],
    ``softmax(logits)[:, 1:2]`` or, for restoration-only models, the MS-GMS map between image and restored. The mode is
    a constructor argument, so an inference config picks it without touching the weights (it changes no parameters).

    Args:
        in_channels: image channels (1 for CT); the restoration net outputs the same number.
        restoration_features: restoration widths, finest first, or None for no restoration net.
        segmentation_features: segmentation widths, finest first, or None for no segmentation net.
        use_highpass: feed the restoration net the Butterworth high-pass of the image (FAIR) instead of the image.
        highpass_cutoff: Butterworth cutoff D0 at ``highpass_reference_size``.
        highpass_order: Butterworth order (2: FAIR's code, 1: the paper's formula).
        highpass_reference_size: image size at which ``highpass_cutoff`` is given.
        restoration_skips: additive skips in the restoration net (FAIR) or none (DRAEM).
        detach_decoder_copy: detach the decoder copy in the skip-decay blocks (WDMT's code).
        output: ``"both"`` or ``"anomaly_map"``.
    """

    # DESIGN.md's two width presets; "paper" is DRAEM/FAIR-size (restoration base 128, segmentation base 64)
    PRESETS: dict[str, dict[str, Any]] = {
        "default": {
            "restoration_features": (16, 32, 64, 128, 128),
            "segmentation_features": (16, 32, 64, 128, 128, 128),
        },
        "paper": {
            "restoration_features": (128, 256, 512, 1024, 1024),
            "segmentation_features": (64, 128, 256, 512, 512, 512),
        },
    }
    __jit_unused_properties__ = ["alpha"]

    def __init__(
        self,
        in_channels: int = 1,
        restoration_features: Sequence[int] | None = (16, 32, 64, 128, 128),
        segmentation_features: Sequence[int] | None = (16, 32, 64, 128, 128, 128),
        use_highpass: bool = True,
        highpass_cutoff: float = 30.0,
        highpass_order: int = 2,
        highpass_reference_size: int = 256,
        restoration_skips: bool = True,
        detach_decoder_copy: bool = False,
        output: str = "both",
    ) -> None:
        super().__init__()
        if restoration_features is None and segmentation_features is None:
            raise ValueError("restoration_features and segmentation_features are both None: nothing to build.")
        if output not in OUTPUT_MODES:
            raise ValueError(f"output must be one of {OUTPUT_MODES}, got {output!r}.")
        self.output = output
        self.highpass: ButterworthHighPass | None = None
        self.restoration: RestorationNet | None = None
        self.segmentation: SkipDecayUNet | None = None
        if restoration_features is not None:
            if use_highpass:
                self.highpass = ButterworthHighPass(highpass_cutoff, highpass_order, highpass_reference_size)
            self.restoration = RestorationNet(
                spatial_dims=2,
                in_channels=in_channels,
                out_channels=in_channels,
                features=restoration_features,
                additive_skips=restoration_skips,
            )
        if segmentation_features is not None:
            seg_in_channels = 2 * in_channels if restoration_features is not None else in_channels
            self.segmentation = SkipDecayUNet(
                spatial_dims=2,
                in_channels=seg_in_channels,
                out_channels=2,
                features=segmentation_features,
                detach_decoder_copy=detach_decoder_copy,
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> FrequencyAwareDetector:
        """Build the detector from a width preset (``"default"`` or ``"paper"``); keyword arguments override it."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(cls.PRESETS)}.")
        return cls(**{**cls.PRESETS[name], **overrides})

    @torch.jit.unused
    def set_alpha(self, value: float) -> None:
        """Set the skip-decay weight of the segmentation net (no-op without one)."""
        if self.segmentation is not None:
            self.segmentation.set_alpha(value)

    @property
    def alpha(self) -> float | None:
        """Current skip-decay weight of the segmentation net, or None without one."""
        if self.segmentation is None:
            return None
        return float(self.segmentation.alpha)

    def forward_both(self, image: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return ``(restored, logits)`` for ``image`` (B, C, H, W); an absent sub-network gives None."""
        restored: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        seg_input = image
        if self.restoration is not None:
            x_in = image
            if self.highpass is not None:
                x_in = self.highpass(image)
            restored = self.restoration(x_in)
            seg_input = torch.cat([restored, image], dim=1)
        if self.segmentation is not None:
            logits = self.segmentation(seg_input)
        return restored, logits

    def anomaly_map(self, image: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, 1, H, W)`` anomaly map in [0, 1] for ``image`` (B, C, H, W)."""
        restored, logits = self.forward_both(image)
        if logits is not None:
            return anomaly_map_from_logits(logits)
        if restored is None:  # unreachable: the constructor requires at least one sub-network
            raise RuntimeError("the detector has neither a restoration nor a segmentation net.")
        return msgms_map(image, restored)

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(restored, logits)`` when ``output="both"``, else the ``(B, 1, H, W)`` anomaly map (see the class doc)."""
        if self.output == "anomaly_map":
            return self.anomaly_map(image)
        return self.forward_both(image)

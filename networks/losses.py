"""Training losses: restoration (MSE + SSIM), segmentation (L1 + focal) and their sum (DRAEM ``loss.py``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import FocalLoss, SSIMLoss

__all__ = ["RestorationLoss", "SegmentationLoss", "DetectorLoss"]


class RestorationLoss(nn.Module):
    """``MSE(restored, clean) + ssim_weight * (1 - SSIM(restored, clean))`` (DRAEM, FAIR; weight 1).

    SSIM uses a Gaussian window 11, sigma 1.5, data range 1, k1 0.01, k2 0.03: DRAEM's window and constants, via
    MONAI's ``SSIMLoss``. Border handling differs: MONAI evaluates SSIM only where the window fits inside the image
    ("valid" convolution) and averages those positions, while DRAEM zero-pads by 5 px and averages over all pixels, so
    its border windows mix in artificial zeros. The two agree in the interior and differ only near the border (where
    the liver-on-black CT slices are mostly background); MONAI's choice does not reward predicting dark borders.

    Input: ``restored`` and ``clean`` ``(B, 1, H, W)`` float, clean in [0, 1], H and W >= 11.
    Output: scalar float32 loss >= 0 (0 for identical images), computed in float32 also under autocast.

    Args:
        ssim_weight: weight of the ``1 - SSIM`` term.
    """

    def __init__(self, ssim_weight: float = 1.0) -> None:
        super().__init__()
        self.ssim_weight = ssim_weight
        self.ssim = SSIMLoss(spatial_dims=2, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5)

    def forward(self, restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Return the scalar restoration loss."""
        # SSIM's variances (E[x^2] - E[x]^2) cancel badly in half precision, and MONAI's trainers compute the loss
        # inside their autocast context: keep the whole term in float32
        with torch.autocast(device_type=restored.device.type, enabled=False):
            restored = restored.float()
            clean = clean.float()
            return F.mse_loss(restored, clean) + self.ssim_weight * self.ssim(restored, clean)


class SegmentationLoss(nn.Module):
    """``l1_weight * L1(softmax(logits)[:, 1], mask) + focal_weight * focal(softmax(logits), mask)``.

    The focal term is DRAEM's (softmax probabilities, gamma 2, alpha None, mean over pixels), computed with MONAI's
    ``FocalLoss(use_softmax=True, to_onehot_y=True)``. MONAI averages over B*C*H*W one-hot entries of which only the
    true class is non-zero, so multiplying by the number of classes C gives DRAEM's per-pixel mean. DRAEM also clamps
    the one-hot targets to [1e-5, 1 - 1e-5] and adds 1e-5 to p_t; this changes the value by O(1e-5) relative except
    for confidently wrong pixels (p_t < ~1e-4), where DRAEM's loss saturates at -log(2e-5) ~ 10.8 and MONAI's
    log-softmax keeps growing -- a numerically safer form (also under mixed precision), chosen on purpose.

    Input: ``logits`` ``(B, C, H, W)`` float (C = 2: normal, anomaly), ``mask`` ``(B, 1, H, W)`` in {0, 1}
    (values > 0.5 count as anomaly for the focal term; the L1 term uses the mask values as they are).
    Output: scalar float loss >= 0.

    Args:
        l1_weight: weight of the L1 term between the anomaly probability and the mask.
        focal_weight: weight of the focal term.
        gamma: focal exponent (DRAEM: 2).
    """

    def __init__(self, l1_weight: float = 1.0, focal_weight: float = 1.0, gamma: float = 2.0) -> None:
        super().__init__()
        self.l1_weight = l1_weight
        self.focal_weight = focal_weight
        self.focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=gamma)

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return the scalar segmentation loss."""
        if logits.ndim != mask.ndim or mask.shape[1] != 1 or logits.shape[2:] != mask.shape[2:]:
            raise ValueError(
                f"expected logits (B, C, *spatial) and mask (B, 1, *spatial), got {list(logits.shape)} "
                f"and {list(mask.shape)}."
            )
        logits = logits.float()
        mask = mask.float()
        anomaly_probability = torch.softmax(logits, dim=1)[:, 1:2]
        l1 = F.l1_loss(anomaly_probability, mask)
        focal = self.focal(logits, (mask > 0.5).float()) * logits.shape[1]
        return self.l1_weight * l1 + self.focal_weight * focal


class DetectorLoss(nn.Module):
    """Joint loss of :class:`networks.detector.FrequencyAwareDetector`: weighted restoration + segmentation terms.

    ``loss = restoration_weight * RestorationLoss(restored, clean) + segmentation_weight * SegmentationLoss(logits,
    mask)``. Either ``restored`` or ``logits`` may be ``None`` (ablations without that sub-network): its term is then
    absent from the sum and from the returned dict.

    Input: ``restored`` ``(B, 1, H, W)`` or None, ``logits`` ``(B, 2, H, W)`` or None, ``clean`` ``(B, 1, H, W)`` in
    [0, 1] (the image before anomaly synthesis), ``mask`` ``(B, 1, H, W)`` in {0, 1} (synthetic anomaly mask).
    Output: dict with ``loss`` (scalar, the sum), and ``restoration`` / ``segmentation`` (scalars) when present.

    Args:
        restoration_weight: weight of the restoration term.
        segmentation_weight: weight of the segmentation term.
        ssim_weight: weight of ``1 - SSIM`` inside the restoration term.
        gamma: focal exponent inside the segmentation term.
    """

    def __init__(
        self,
        restoration_weight: float = 1.0,
        segmentation_weight: float = 1.0,
        ssim_weight: float = 1.0,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.restoration_weight = restoration_weight
        self.segmentation_weight = segmentation_weight
        self.restoration_loss = RestorationLoss(ssim_weight=ssim_weight)
        self.segmentation_loss = SegmentationLoss(gamma=gamma)

    def forward(
        self,
        restored: torch.Tensor | None,
        logits: torch.Tensor | None,
        clean: torch.Tensor,
        mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Return ``{"loss": total, "restoration": ..., "segmentation": ...}`` (absent terms left out)."""
        if restored is None and logits is None:
            raise ValueError("both restored and logits are None: the model produced nothing to train.")
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=clean.device)
        if restored is not None:
            terms["restoration"] = self.restoration_loss(restored, clean)
            total = total + self.restoration_weight * terms["restoration"]
        if logits is not None:
            terms["segmentation"] = self.segmentation_loss(logits, mask)
            total = total + self.segmentation_weight * terms["segmentation"]
        return {"loss": total, **terms}

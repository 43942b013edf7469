"""Anomaly maps and image scores: DRAEM's softmax map and mean-filter max score, FAIR's MS-GMS map.

The one home of the slice score: the model, the ignite metrics, the evaluation report and the trivial baselines all
call :func:`image_scores` (torch tensors in, or numpy arrays for the CPU-side baselines and reports).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_SF", "anomaly_map_from_logits", "smooth_map", "image_scores", "msgms_map"]

# The image score's mean-filter size (DRAEM, FAIR: 21 px); a bundle records its own in models/inference.json.
DEFAULT_SF = 21


def anomaly_map_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Anomaly probability map ``softmax(logits, dim=1)[:, 1:2]``.

    Args:
        logits: ``(B, 2, H, W)`` float segmentation logits (channel 1 = anomaly).

    Returns:
        ``(B, 1, H, W)`` float map in [0, 1].
    """
    return torch.softmax(logits, dim=1)[:, 1:2]


def smooth_map(anomaly_map: torch.Tensor, sf: int = DEFAULT_SF) -> torch.Tensor:
    """Zero-padded ``sf`` x ``sf`` mean filter, as DRAEM's test (``avg_pool2d(..., sf, 1, sf // 2)``).

    ``count_include_pad=True`` divides by ``sf**2`` also at the border, i.e. pixels outside the image count as 0.

    Args:
        anomaly_map: ``(B, C, H, W)`` float map.
        sf: odd filter size (DRAEM/FAIR: 21).

    Returns:
        ``(B, C, H, W)`` float map, same range as the input (values shrink towards 0 at the border).
    """
    if sf < 1 or sf % 2 == 0:
        raise ValueError(f"sf must be a positive odd integer (the map keeps its size), got {sf}.")
    return F.avg_pool2d(anomaly_map, kernel_size=sf, stride=1, padding=sf // 2, count_include_pad=True)


def image_scores(
    maps: torch.Tensor | np.ndarray, sf: int = DEFAULT_SF, mask: torch.Tensor | np.ndarray | None = None
) -> torch.Tensor | np.ndarray:
    """Image anomaly score = max over pixels of the ``sf`` x ``sf`` mean-filtered map (DRAEM, FAIR).

    Args:
        maps: ``(B, 1, H, W)`` float anomaly maps (e.g. in [0, 1]), a tensor or a numpy array; numpy arrays may also
            be ``(B, H, W)`` slice stacks.
        sf: odd mean-filter size.
        mask: optional ``(B, 1, H, W)`` {0, 1} region mask (the liver), same kind and shape as ``maps``; the map is
            multiplied by it before smoothing, so only in-mask pixels contribute (liver-only scoring).

    Returns:
        ``(B,)`` scores, in the range of the maps: a float tensor of the maps' dtype for a tensor, a float64 numpy
        array for a numpy array (computed in float64, so a report's scores do not depend on the map's storage dtype).
    """
    if isinstance(maps, np.ndarray):
        return _numpy_image_scores(maps, sf, mask)
    if mask is not None:
        if mask.shape != maps.shape:
            raise ValueError(f"mask shape {list(mask.shape)} must equal the maps' shape {list(maps.shape)}.")
        maps = maps * mask.to(maps.dtype)
    return smooth_map(maps, sf).flatten(1).amax(dim=1)


def _numpy_image_scores(maps: np.ndarray, sf: int, mask: np.ndarray | None) -> np.ndarray:
    """:func:`image_scores` of a numpy ``(B, H, W)`` or ``(B, 1, H, W)`` stack: float64 on the CPU, float64 ``(B,)``."""
    if maps.ndim not in (3, 4) or (maps.ndim == 4 and maps.shape[1] != 1):
        raise ValueError(f"maps must have shape (B, H, W) or (B, 1, H, W), got {maps.shape}.")
    if mask is not None and np.shape(mask) != maps.shape:
        raise ValueError(f"mask shape {list(np.shape(mask))} must equal the maps' shape {list(maps.shape)}.")

    def as_batch(a: np.ndarray) -> torch.Tensor:  # (B, 1, H, W) float64
        return torch.from_numpy(np.asarray(a, dtype=np.float64)).reshape(maps.shape[0], 1, *maps.shape[-2:])

    return image_scores(as_batch(maps), sf=sf, mask=None if mask is None else as_batch(mask)).numpy()


def _gradient_magnitude(image: torch.Tensor) -> torch.Tensor:
    """Prewitt gradient magnitude per channel (zero padding, as FAIR ``msgms.py``)."""
    channels = image.shape[1]
    prewitt_x = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [1.0, 0.0, -1.0]], device=image.device) / 3.0
    kernels = torch.stack([prewitt_x, prewitt_x.t()])[:, None].repeat(channels, 1, 1, 1).to(image.dtype)
    gradients = F.conv2d(image, kernels, padding=1, groups=channels)  # (B, 2C, H, W): x and y per channel
    squared = gradients.unflatten(1, (channels, 2)).pow(2).sum(dim=2)
    return torch.sqrt(squared + 1e-12)


def msgms_map(image: torch.Tensor, restored: torch.Tensor, scales: int = 2) -> torch.Tensor:
    """FAIR's multi-scale gradient magnitude similarity (MS-GMS) anomaly map between an image and its restoration.

    At each scale (average-pooled by 2 per scale) ``GMS = (2 g1 g2 + c) / (g1**2 + g2**2 + c)``, ``c = 0.0026``, with
    Prewitt gradient magnitudes ``g``; GMS is bilinearly upsampled (``align_corners=False``) to full size, and the map
    is ``1 - mean over scales``, averaged over channels, clamped to [0, 1]. FAIR adds a small Lab colour term for RGB
    images, which has no meaning for 1-channel CT and is left out.

    Args:
        image: ``(B, C, H, W)`` float image in [0, 1].
        restored: ``(B, C, H, W)`` float restoration of ``image``.
        scales: number of scales (FAIR: 2).

    Returns:
        ``(B, 1, H, W)`` float32 map in [0, 1]; ~0 where the two images have the same local structure. Computed in
        float32, also under autocast.
    """
    if image.shape != restored.shape:
        raise ValueError(f"image {list(image.shape)} and restored {list(restored.shape)} must have the same shape.")
    if scales < 1:
        raise ValueError(f"scales must be >= 1, got {scales}.")
    if torch.jit.is_scripting():
        return _msgms(image, restored, scales)
    # autocast would run the Prewitt convolutions in half precision, too coarse for GMS's constant c = 0.0026
    with torch.autocast(device_type=image.device.type, enabled=False):
        return _msgms(image, restored, scales)


def _msgms(image: torch.Tensor, restored: torch.Tensor, scales: int) -> torch.Tensor:
    """The computation of :func:`msgms_map`, in float32."""
    first = image.float()
    second = restored.float()
    size = (image.shape[-2], image.shape[-1])
    total = torch.zeros_like(first)
    for scale in range(scales):
        if scale > 0:
            first = F.avg_pool2d(first, kernel_size=2, stride=2)
            second = F.avg_pool2d(second, kernel_size=2, stride=2)
        g1 = _gradient_magnitude(first)
        g2 = _gradient_magnitude(second)
        gms = (2.0 * g1 * g2 + 0.0026) / (g1**2 + g2**2 + 0.0026)
        total = total + F.interpolate(gms, size=size, mode="bilinear", align_corners=False)
    return (1.0 - total / scales).mean(dim=1, keepdim=True).clamp(0.0, 1.0)

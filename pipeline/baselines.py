"""Trivial anomaly scores that expose confounds; reports list them beside the model.

A model is only interesting where it beats these. On LiTS-derived slices, lesions correlate with large liver
cross-sections (``liver_area``) and are mostly hypodense (``liver_mean_low``, ``darkness``), so a high image AUROC can
come from slice size or brightness alone. ``random`` checks the evaluation itself (it must give about 0.5).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from networks.scoring import image_scores
from pipeline.metrics import StreamingAUROC, as_binary, as_numpy, as_slices, image_auroc_by_strata, roc_auc

__all__ = ["darkness_map", "slice_baseline_scores", "box_mean_max", "baseline_report"]

SLICE_BASELINES = ("liver_area", "liver_mean_low", "liver_std", "random")


def darkness_map(image: Any, liver: Any) -> Any:
    """Pixel anomaly map "darker = more anomalous" inside the liver: ``(1 - image) * liver``.

    Args:
        image: ``(..., H, W)`` windowed CT in [0, 1], numpy array or torch tensor, float.
        liver: same shape, binary liver mask (bool or {0, 1}), same kind as ``image``.

    Returns:
        same shape and kind (and float dtype) as ``image``, in [0, 1]; exactly 0 outside the liver.
    """
    if tuple(image.shape) != tuple(liver.shape):
        raise ValueError(
            f"image and liver must have the same shape, got {tuple(image.shape)} and {tuple(liver.shape)}."
        )
    return (1 - image) * (liver > 0)


def _checked_stacks(images: Any, livers: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(N, H, W)`` float64 images and bool livers of the same shape."""
    x = as_slices(images, "images").astype(np.float64)
    liver = as_binary(as_slices(livers, "livers"), "livers")
    if x.shape != liver.shape:
        raise ValueError(f"images and livers must have the same shape, got {x.shape} and {liver.shape}.")
    return x, liver


def slice_baseline_scores(images: Any, livers: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-slice confound scores, each oriented so that higher = more anomalous.

    Args:
        images: ``(N, H, W)`` or ``(N, 1, H, W)`` windowed CT in [0, 1].
        livers: same shape, binary liver masks.
        seed: seed of the ``random`` score.

    Returns:
        float64 ``(N,)`` arrays: ``"liver_area"`` (liver pixels), ``"liver_mean_low"`` (minus the mean intensity in
        the liver: darker liver = more anomalous), ``"liver_std"`` (intensity std in the liver) and ``"random"``
        (uniform in [0, 1), from ``np.random.RandomState(seed)``). Slices with an empty liver mask rank as the
        least anomalous for the liver-intensity scores.
    """
    x, liver = _checked_stacks(images, livers)
    area = liver.sum(axis=(1, 2)).astype(np.float64)
    empty = area == 0
    safe_area = np.where(empty, 1.0, area)
    mean = np.where(liver, x, 0.0).sum(axis=(1, 2)) / safe_area
    variance = np.where(liver, (x - mean[:, None, None]) ** 2, 0.0).sum(axis=(1, 2)) / safe_area
    mean_low, std = -mean, np.sqrt(variance)
    # A slice whose liver vanished on the resampled grid (a few native voxels) has no liver statistics: rank it as
    # the least anomalous rather than failing the whole report.
    if empty.any() and not empty.all():
        mean_low[empty] = mean_low[~empty].min()
        std[empty] = std[~empty].min()
    return {
        "liver_area": area,
        "liver_mean_low": mean_low,
        "liver_std": std,
        "random": np.random.RandomState(seed).uniform(size=x.shape[0]),
    }


def box_mean_max(maps: Any, sf: int = 21) -> np.ndarray:
    """Image scores of DRAEM: max of the ``sf x sf`` zero-padded box mean of each map.

    Equal to ``avg_pool2d(maps, sf, stride=1, padding=sf // 2).amax((-2, -1))`` (``count_include_pad=True``).

    Args:
        maps: ``(N, H, W)`` or ``(N, 1, H, W)`` anomaly maps, real.
        sf: odd box size in pixels.

    Returns:
        float64 ``(N,)`` scores.
    """
    # one implementation of the slice score: the model's own (networks.scoring), in float64 here
    m = torch.from_numpy(as_slices(maps, "maps").astype(np.float64))[:, None]
    return image_scores(m, sf=sf).numpy()


def _auroc_or_nan(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC, or nan when the slice set holds one class only (undefined, never a silent 0.5)."""
    return roc_auc(scores, labels) if 0 < labels.sum() < labels.size else float("nan")


def baseline_report(
    images: Any,
    livers: Any,
    lesions: Any,
    sf: int = 21,
    seed: int = 0,
    labels: Any | None = None,
    darkness_scores: np.ndarray | None = None,
) -> dict[str, Any]:
    """AUROCs of the confound baselines on a labelled slice set.

    A slice is anomalous when its lesion mask has any pixel. Scores keep their stated direction (no ``max(auc,
    1 - auc)``), so an AUROC well below 0.5 is a finding too.

    Args:
        images: ``(N, H, W)`` or ``(N, 1, H, W)`` windowed CT in [0, 1].
        livers: same shape, binary liver masks.
        lesions: same shape, binary lesion masks; both normal and lesion slices must be present.
        sf: odd box size of the darkness image score (DRAEM: 21).
        seed: seed of the ``random`` baseline.
        labels: optional ``(N,)`` slice labels (e.g. the manifest's ``has_lesion``, counted on the native grid);
            default: a slice is anomalous when its lesion mask has any pixel.
        darkness_scores: the darkness image scores if the caller already computed them (``box_mean_max`` of
            ``darkness_map``); computed here otherwise.

    Returns:
        ``{"n_slices", "n_lesion_slices",
        "image_auroc": {"liver_area", "liver_mean_low", "liver_std", "random", "darkness"},
        "pixel_auroc": {"darkness_all", "darkness_liver"}, "pixel_auroc_error_bound": {same keys},
        "darkness_by_liver_area": image_auroc_by_strata(...)}``. Pixel AUROCs use the raw darkness map, over all
        pixels or liver pixels only, with :class:`~pipeline.metrics.StreamingAUROC` (its binning error bound beside).

    Raises:
        ValueError: bad shapes or non-binary masks. With one class of slices only, the image AUROCs are nan.
    """
    x, liver = _checked_stacks(images, livers)
    lesion = as_binary(as_slices(lesions, "lesions"), "lesions")
    if lesion.shape != x.shape:
        raise ValueError(f"lesions must have the shape of images {x.shape}, got {lesion.shape}.")
    labels = lesion.any(axis=(1, 2)) if labels is None else as_numpy(labels).reshape(-1).astype(bool)
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have one entry per slice ({x.shape[0]}), got {labels.shape[0]}.")

    slice_scores = slice_baseline_scores(x, liver, seed=seed)
    darkness = darkness_map(x, liver)
    if darkness_scores is None:
        darkness_scores = box_mean_max(darkness, sf=sf)
    image_auroc = {name: _auroc_or_nan(slice_scores[name], labels) for name in SLICE_BASELINES}
    image_auroc["darkness"] = _auroc_or_nan(darkness_scores, labels)

    pixel_auroc, pixel_bound = {}, {}
    for name, region in (("darkness_all", None), ("darkness_liver", liver)):
        metric = StreamingAUROC(score_range=(0.0, 1.0))
        metric.update(darkness, lesion, mask=region)
        pixel_auroc[name] = metric.compute()
        pixel_bound[name] = metric.error_bound()

    return {
        "n_slices": int(labels.size),
        "n_lesion_slices": int(labels.sum()),
        "image_auroc": image_auroc,
        "pixel_auroc": pixel_auroc,
        "pixel_auroc_error_bound": pixel_bound,
        "darkness_by_liver_area": image_auroc_by_strata(darkness_scores, labels, slice_scores["liver_area"]),
    }

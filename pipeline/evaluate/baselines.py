"""Trivial anomaly scores that expose confounds; reports list them beside the model.

A model is only interesting where it beats these. On LiTS-derived slices, lesions correlate with large liver
cross-sections (``liver_area``) and are mostly hypodense (``liver_mean_low``, ``darkness``), so a high image AUROC can
come from slice size or brightness alone. Two stronger pixel maps need no training either: ``deviation`` (how far a
pixel is from its volume's median liver intensity, either way: hypo- and hyperdense lesions) and ``local_contrast``
(how much darker a pixel is than the liver around it, ~30 mm). ``deviation_smoothed`` is the deviation map after a
Gaussian of :data:`SMOOTHING_MM`: a per-pixel map carries the CT's noise, which a network's blob-like map does not, and
on IRCADb p17 this denoising alone lifts the deviation map's pixel AUROC in the liver from 0.84 to 0.96.
``random`` checks the evaluation itself (it must give about 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from networks.scoring import DEFAULT_SF, image_scores
from pipeline.evaluate.localisation import image_auroc_by_strata
from pipeline.evaluate.metrics import StreamingAUROC, as_binary, as_numpy, as_slices, erode, roc_auc

__all__ = ["darkness_map", "deviation_map", "local_contrast_map", "smoothed_map", "smoothing_sigma_px",
           "baseline_maps", "slice_baseline_scores", "baseline_report"]

SLICE_BASELINES = ("liver_area", "liver_mean_low", "liver_std", "random")
#: pixel-map baselines, in report order
MAP_BASELINES = ("darkness", "deviation", "deviation_smoothed", "local_contrast")
#: width of the local-contrast window in mm (a small lesion's neighbourhood)
LOCAL_CONTRAST_MM = 30.0
#: Gaussian sigma in mm of ``deviation_smoothed`` (about 2 pixels at 128 px over 300 mm)
SMOOTHING_MM = 5.0
#: pixel size assumed when a caller gives none: 128 px over a 300 mm field (the bundle's default preparation)
DEFAULT_MM_PER_PIXEL = 300.0 / 128


def smoothing_sigma_px(mm_per_pixel: float | None) -> float:
    """The :data:`SMOOTHING_MM` Gaussian sigma in pixels of ``mm_per_pixel`` (None: :data:`DEFAULT_MM_PER_PIXEL`):
    the one conversion the ``deviation_smoothed`` baseline and the model's like-for-like smoothed metrics share."""
    return SMOOTHING_MM / (DEFAULT_MM_PER_PIXEL if mm_per_pixel is None else float(mm_per_pixel))


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


def deviation_map(images: Any, livers: Any, case_ids: Sequence[str] | None = None) -> np.ndarray:
    """Two-sided deviation ``|I - median liver intensity of the volume|`` inside the liver, 0 outside.

    In: ``images`` ``(N, H, W)`` or ``(N, 1, H, W)`` windowed CT in [0, 1], ``livers`` same shape binary, ``case_ids``
    ``(N,)`` the volume of each slice (None: all slices are one volume). Out: float64 ``(N, H, W)`` in [0, 1].
    """
    x, liver = _checked_stacks(images, livers)
    ids = np.asarray(["" for _ in range(len(x))] if case_ids is None else list(case_ids))
    if ids.shape != (len(x),):
        raise ValueError(f"give one case id per slice ({len(x)}), got {ids.shape}.")
    out = np.zeros_like(x)
    for case in np.unique(ids):
        rows = ids == case
        inside = liver[rows]
        if inside.any():
            median = np.median(x[rows][inside])
            out[rows] = np.abs(x[rows] - median) * inside
    return out


def smoothed_map(maps: Any, livers: Any, sigma_px: float) -> np.ndarray:
    """A map zeroed outside the liver, Gaussian-smoothed in-plane (``sigma_px`` pixels; outside counts as 0), and
    zeroed outside the liver again.

    In: ``maps`` and ``livers`` ``(N, H, W)`` or ``(N, 1, H, W)``, maps in [0, 1], livers binary. Out: float64
    ``(N, H, W)`` in [0, 1]; ``sigma_px`` = 0 returns the masked map.
    """
    x, liver = _checked_stacks(maps, livers)
    if not sigma_px >= 0:
        raise ValueError(f"sigma_px must be >= 0, got {sigma_px!r}.")
    masked = x * liver
    if sigma_px == 0:
        return masked
    return ndimage.gaussian_filter(masked, sigma=(0.0, sigma_px, sigma_px), mode="constant") * liver


def local_contrast_map(images: Any, livers: Any, window_px: int = 13) -> np.ndarray:
    """Local contrast ``mean of the liver in a window around the pixel - I`` inside the liver, 0 outside.

    The mean is over liver pixels only (a masked box mean of ``window_px`` x ``window_px``), so the liver border does
    not mix in the zero background. Positive where a pixel is darker than the liver around it.

    In: ``images`` ``(N, H, W)`` or ``(N, 1, H, W)`` in [0, 1], ``livers`` binary, same shape. Out: float64
    ``(N, H, W)`` in [-1, 1].
    """
    x, liver = _checked_stacks(images, livers)
    w = max(1, int(window_px) | 1)  # odd
    pool = torch.nn.functional.avg_pool2d
    xl = torch.from_numpy(x * liver)[:, None]
    lv = torch.from_numpy(liver.astype(np.float64))[:, None]
    sums = pool(xl, w, stride=1, padding=w // 2, count_include_pad=True)
    counts = pool(lv, w, stride=1, padding=w // 2, count_include_pad=True)
    local = (sums / counts.clamp_min(1e-12))[:, 0].numpy()
    return (local - x) * liver


def _checked_stacks(images: Any, livers: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(N, H, W)`` float64 images and bool livers of the same shape."""
    x = as_slices(images, "images").astype(np.float64)
    liver = as_binary(as_slices(livers, "livers"), "livers")
    if x.shape != liver.shape:
        raise ValueError(f"images and livers must have the same shape, got {x.shape} and {liver.shape}.")
    return x, liver


def baseline_maps(
    images: Any, livers: Any, case_ids: Sequence[str] | None = None, mm_per_pixel: float | None = None
) -> dict[str, np.ndarray]:
    """The :data:`MAP_BASELINES` maps of a slice stack, in that order, each zero outside the liver.

    In: ``images`` ``(N, H, W)`` or ``(N, 1, H, W)`` windowed CT in [0, 1], ``livers`` same shape binary, ``case_ids``
    and ``mm_per_pixel`` as in :func:`baseline_report`. Out: float64 ``(N, H, W)`` maps.
    """
    x, liver = _checked_stacks(images, livers)
    mm = DEFAULT_MM_PER_PIXEL if mm_per_pixel is None else mm_per_pixel
    deviation = deviation_map(x, liver, case_ids)
    return {
        "darkness": darkness_map(x, liver),
        "deviation": deviation,
        "deviation_smoothed": smoothed_map(deviation, liver, smoothing_sigma_px(mm)),
        "local_contrast": local_contrast_map(x, liver, round(LOCAL_CONTRAST_MM / mm)),
    }


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


def _auroc_or_nan(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC, or nan when the slice set holds one class only (undefined, never a silent 0.5)."""
    return roc_auc(scores, labels) if 0 < labels.sum() < labels.size else float("nan")


def _pixel_aurocs(
    maps: dict[str, np.ndarray], lesion: np.ndarray, liver: np.ndarray
) -> tuple[dict[str, float], dict[str, float]]:
    """Streaming pixel AUROC of each map over all pixels, the liver and the eroded liver, and its error bound.

    In: ``maps`` name -> ``(N, H, W)`` map (``local_contrast`` in [-1, 1], the others in [0, 1]), ``lesion`` and
    ``liver`` ``(N, H, W)`` bool. Out: ``({"<map>_<region>": auroc}, {same keys: error bound})``, nan without both
    classes in the region.
    """
    regions = {"all": None, "liver": liver, "liver_eroded": erode(liver)}
    pixel_auroc, pixel_bound = {}, {}
    for name, pixel_map in maps.items():
        for region_name, region in regions.items():
            metric = StreamingAUROC(score_range=(-1.0, 1.0) if name == "local_contrast" else (0.0, 1.0))
            metric.update(pixel_map, lesion, mask=region)
            positives, negatives = metric.counts
            key = f"{name}_{region_name}"
            pixel_auroc[key] = metric.compute() if positives and negatives else float("nan")
            pixel_bound[key] = metric.error_bound() if positives and negatives else float("nan")
    return pixel_auroc, pixel_bound


def baseline_report(
    images: Any,
    livers: Any,
    lesions: Any,
    sf: int = DEFAULT_SF,
    seed: int = 0,
    labels: Any | None = None,
    darkness_scores: np.ndarray | None = None,
    case_ids: Sequence[str] | None = None,
    mm_per_pixel: float | None = None,
) -> dict[str, Any]:
    """AUROCs of the confound baselines on a labelled slice set.

    A slice is anomalous when its lesion mask has any pixel. Scores keep their stated direction (no ``max(auc,
    1 - auc)``), so an AUROC well below 0.5 is a finding too.

    Args:
        images: ``(N, H, W)`` or ``(N, 1, H, W)`` windowed CT in [0, 1].
        livers: same shape, binary liver masks.
        lesions: same shape, binary lesion masks; both normal and lesion slices must be present.
        sf: odd box size of the map baselines' image score (:func:`networks.scoring.image_scores`, as the model's).
        seed: seed of the ``random`` baseline.
        labels: optional ``(N,)`` slice labels (e.g. the manifest's ``has_lesion``, counted on the native grid);
            default: a slice is anomalous when its lesion mask has any pixel.
        darkness_scores: the darkness image scores if the caller already computed them (``image_scores`` of
            ``darkness_map``); computed here otherwise.
        case_ids: ``(N,)`` volume of each slice, for the per-volume median of ``deviation`` (None: one volume).
        mm_per_pixel: slice pixel size, for the :data:`LOCAL_CONTRAST_MM` window and the :data:`SMOOTHING_MM` sigma
            (None: 13 and 2.1 pixels, 30 and 5 mm at 128 px over a 300 mm field).

    Returns:
        ``{"n_slices", "n_lesion_slices",
        "image_auroc": {"liver_area", "liver_mean_low", "liver_std", "random", "darkness", "deviation",
        "deviation_smoothed", "local_contrast"}, "pixel_auroc": {"<map>_all", "<map>_liver", "<map>_liver_eroded"
        for each map baseline}, "pixel_auroc_error_bound": {same keys}, "darkness_by_liver_area":
        image_auroc_by_strata(...)}``. Pixel AUROCs use the maps over all pixels, liver pixels, or liver pixels at least
        :data:`~pipeline.evaluate.metrics.LIVER_EROSION_PX` pixels from the liver border, with
        :class:`~pipeline.evaluate.metrics.StreamingAUROC` (its binning error bound beside).

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
    maps = baseline_maps(x, liver, case_ids, mm_per_pixel)
    if darkness_scores is None:
        darkness_scores = image_scores(maps["darkness"], sf=sf)
    image_auroc = {name: _auroc_or_nan(slice_scores[name], labels) for name in SLICE_BASELINES}
    for name, pixel_map in maps.items():
        scores = darkness_scores if name == "darkness" else image_scores(pixel_map, sf=sf)
        image_auroc[name] = _auroc_or_nan(scores, labels)

    pixel_auroc, pixel_bound = _pixel_aurocs(maps, lesion, liver)
    return {
        "n_slices": int(labels.size),
        "n_lesion_slices": int(labels.sum()),
        "image_auroc": image_auroc,
        "pixel_auroc": pixel_auroc,
        "pixel_auroc_error_bound": pixel_bound,
        "darkness_by_liver_area": image_auroc_by_strata(darkness_scores, labels, slice_scores["liver_area"]),
    }

"""Localisation metrics of anomaly maps and a confound check of slice scores: AUPRO, best Dice, FROC-style lesion
sensitivity and area-stratified image AUROC.

numpy/scipy only, like :mod:`pipeline.evaluate.metrics` (whose array coercion and AUROC they reuse), so training
validation, evaluation reports and ``compare`` can call them on CPU arrays without torch; torch tensors are accepted and
converted at the boundary.

Conventions shared by every function here:

- labels and masks are binary: bool or numbers in {0, 1}; anything else raises ``ValueError`` (binarise soft masks
  upstream, e.g. ``> 0.5`` after nearest resizing).
- a pixel is "detected" at threshold ``t`` when its score is strictly above ``t``.
- slice stacks are ``(N, H, W)``; ``(H, W)`` and ``(N, 1, H, W)`` are accepted and reshaped to that.
- regions and lesions are 2D connected components with 8-connectivity, found slice by slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.evaluate.metrics import as_binary, as_finite_scores, as_slices, check_same_shape, roc_auc

__all__ = ["aupro", "best_dice", "lesion_sensitivity_at_fp", "image_auroc_by_strata"]

# 8-connectivity inside each slice and no connection across slices, so one `ndimage.label` call labels a whole stack.
_IN_PLANE_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_8_CONNECTIVITY[1] = True

_DEFAULT_FROC_THRESHOLDS = 64


def _sum_above(values: np.ndarray, thresholds: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """For each threshold ``t``: how many ``values`` (or their summed ``weights``) are strictly above ``t``.

    O(len(values) * log(len(thresholds))): one sort of the thresholds, one search and one bincount of the values.
    """
    order = np.argsort(thresholds)
    n_below = np.searchsorted(thresholds[order], values, side="left")  # = number of thresholds < value
    hist = np.bincount(n_below, weights=weights, minlength=thresholds.size + 1)
    above_sorted = np.cumsum(hist[::-1])[::-1][1:]  # value > sorted threshold k  <=>  n_below > k
    result = np.empty(thresholds.size, dtype=np.float64)
    result[order] = above_sorted
    return result


def _maps_and_masks(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    m = as_finite_scores(as_slices(maps, "maps"), "maps")
    g = as_binary(as_slices(masks, "masks"), "masks")
    check_same_shape(m, g, "maps", "masks")
    return m, g


def _label_slices(binary: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) of each slice of an ``(N, H, W)`` bool stack, numbered across the stack."""
    return ndimage.label(binary, structure=_IN_PLANE_8_CONNECTIVITY)


def _partial_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x, y) from x[0] to ``x_max``, interpolating the end point.

    ``x`` must be non-decreasing and reach ``x_max``.
    """
    n_inside = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:n_inside], y[:n_inside]
    if xs[-1] < x_max:
        x0, y0, x1, y1 = x[n_inside - 1], y[n_inside - 1], x[n_inside], y[n_inside]
        xs = np.append(xs, x_max)
        ys = np.append(ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0))
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(maps: Any, masks: Any, max_fpr: float = 0.3, n_thresholds: int = 200) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``max_fpr``, as in MVTec AD / anomalib.

    Regions are the connected components (8-connectivity) of each slice's mask. At threshold ``t``:
    PRO = mean over all regions of all slices of (region pixels with map > t) / (region size), and
    FPR = (mask-negative pixels with map > t) / (all mask-negative pixels), over all slices (normal slices included).
    The PRO-over-FPR polyline from (0, 0) is integrated with the trapezoid rule up to ``max_fpr`` (end point
    interpolated) and divided by ``max_fpr``, so a perfect map scores 1.

    Thresholds: ``n_thresholds`` quantiles of the negative pixels' scores chosen so that FPR steps evenly through
    ``[0, max_fpr]`` (the part that is integrated), plus ``n_thresholds`` quantiles of the region pixels' scores so that
    no jump of PRO is missed. With many pixels the result is within about ``max_fpr / n_thresholds`` of the all-scores
    curve of the MVTec AD reference code.

    Args:
        maps: ``(N, H, W)`` anomaly maps, real, higher = more anomalous.
        masks: ``(N, H, W)`` binary ground truth.
        max_fpr: upper FPR limit in (0, 1].
        n_thresholds: thresholds taken from each class (>= 2).

    Returns:
        AUPRO in [0, 1]; ``nan`` when the masks contain no region.

    Raises:
        ValueError: bad shapes or values, no negative pixel, ``max_fpr`` outside (0, 1].
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}.")
    if n_thresholds < 2:
        raise ValueError(f"n_thresholds must be >= 2, got {n_thresholds}.")
    m, g = _maps_and_masks(maps, masks)
    regions, n_regions = _label_slices(g)
    if n_regions == 0:
        return float("nan")
    negatives = m[~g]
    if negatives.size == 0:
        raise ValueError("aupro needs mask-negative pixels to measure the false positive rate; the masks cover all.")
    region_of_pixel = regions[g]
    region_sizes = np.bincount(region_of_pixel)
    pixel_weights = 1.0 / (region_sizes[region_of_pixel] * n_regions)  # region pixels of one region sum to 1/R

    thresholds = np.unique(
        np.concatenate(
            [
                np.quantile(negatives, np.linspace(1.0 - max_fpr, 1.0, n_thresholds)),
                np.quantile(m[g], np.linspace(0.0, 1.0, n_thresholds)),
            ]
        )
    )[::-1]  # decreasing thresholds: FPR and PRO both grow along the curve
    fpr = _sum_above(negatives, thresholds) / negatives.size
    pro = _sum_above(m[g], thresholds, weights=pixel_weights)
    # the curve starts at (0, 0) (threshold +inf) and ends at (1, 1) (threshold -inf)
    fpr = np.concatenate([[0.0], fpr, [1.0]])
    pro = np.concatenate([[0.0], np.minimum(pro, 1.0), [1.0]])  # minimum: rounding of the weights could pass 1
    return _partial_area(fpr, pro, max_fpr) / max_fpr


def best_dice(maps: Any, masks: Any, n_thresholds: int = 200) -> tuple[float, float]:
    """Best dataset-level Dice over thresholds: pixels of all slices pooled, ``2 TP / (2 TP + FP + FN)``.

    Thresholds: ``n_thresholds`` values evenly spaced strictly inside ``(min(maps), max(maps))``; a pixel is
    predicted anomalous when its map value is above the threshold.

    Args:
        maps: ``(N, H, W)`` anomaly maps, real.
        masks: ``(N, H, W)`` binary ground truth.
        n_thresholds: number of thresholds (>= 1).

    Returns:
        ``(dice, threshold)``: the best Dice in [0, 1] and the threshold giving it (the lowest on ties);
        ``(nan, nan)`` when the masks have no positive pixel.
    """
    if n_thresholds < 1:
        raise ValueError(f"n_thresholds must be >= 1, got {n_thresholds}.")
    m, g = _maps_and_masks(maps, masks)
    n_gt = int(g.sum())
    if n_gt == 0:
        return float("nan"), float("nan")
    thresholds = np.linspace(m.min(), m.max(), n_thresholds + 2)[1:-1]
    tp = _sum_above(m[g], thresholds)
    n_predicted = _sum_above(m.reshape(-1), thresholds)
    dice = 2.0 * tp / (n_predicted + n_gt)
    best = int(np.argmax(dice))
    return float(dice[best]), float(thresholds[best])


def lesion_sensitivity_at_fp(
    maps: Any,
    masks: Any,
    threshold_grid: Sequence[float] | np.ndarray | None = None,
    fp_rates: Sequence[float] = (0.125, 0.25, 0.5, 1, 2, 4, 8),
) -> dict[float, float]:
    """FROC-style lesion sensitivity at given mean numbers of false positives per slice.

    At each threshold ``t``, the candidates are the connected components (8-connectivity) of ``map > t`` in each slice.
    A lesion (connected component of a slice's mask) is hit when a candidate overlaps it, i.e. when one of its pixels
    is above ``t``. A false positive is a candidate that overlaps no lesion. For each rate ``r`` the result is the best
    sensitivity among thresholds whose false positives per slice (over all ``N`` slices, normal ones included) are
    ``<= r``, and 0 when no threshold qualifies.

    Args:
        maps: ``(N, H, W)`` anomaly maps, real.
        masks: ``(N, H, W)`` binary ground truth.
        threshold_grid: thresholds to try; default 64 values evenly spaced strictly inside the maps' range. Each costs
            one connected-component labelling of the whole stack.
        fp_rates: mean false positives per slice at which to report sensitivity.

    Returns:
        ``{rate: sensitivity in [0, 1]}`` for each rate (as float keys); all ``nan`` when the masks have no lesion.
    """
    m, g = _maps_and_masks(maps, masks)
    lesions, n_lesions = _label_slices(g)
    rates = [float(r) for r in fp_rates]
    if n_lesions == 0:
        return {r: float("nan") for r in rates}
    if threshold_grid is None:
        thresholds = np.linspace(m.min(), m.max(), _DEFAULT_FROC_THRESHOLDS + 2)[1:-1]
    else:
        thresholds = np.asarray(threshold_grid, dtype=np.float64).reshape(-1)
    # a lesion is hit at t exactly when its highest pixel is above t, so hits need no labelling per threshold
    # only lesion pixels matter: restricting to them avoids scipy sorting the whole stack (100x faster)
    inside = lesions > 0
    lesion_peaks = ndimage.maximum(m[inside], labels=lesions[inside], index=np.arange(1, n_lesions + 1))
    sensitivity = _sum_above(np.asarray(lesion_peaks), thresholds) / n_lesions
    fp_per_slice = np.empty(thresholds.size)
    for k, t in enumerate(thresholds):
        candidates, n_candidates = _label_slices(m > t)
        n_true = np.unique(candidates[g & (candidates > 0)]).size
        fp_per_slice[k] = (n_candidates - n_true) / m.shape[0]
    result = {}
    for r in rates:
        allowed = fp_per_slice <= r
        result[r] = float(sensitivity[allowed].max()) if np.any(allowed) else 0.0
    return result


def image_auroc_by_strata(scores: Any, labels: Any, strata: Any, n_strata: int = 4) -> dict[str, Any]:
    """Image AUROC within quantile bins of a confounding value, e.g. liver area ("area-matched" AUROC).

    Slices are split into ``n_strata`` bins at the quantiles of ``strata`` (bin ``k`` holds ``edge_k <= v < edge_k+1``,
    the last bin also its upper edge); AUROC is computed inside each bin. If the score only tracks the confound, the
    per-stratum AUROCs fall towards 0.5 while the pooled one stays high.

    Args:
        scores: ``(N,)`` image scores, real.
        labels: ``(N,)`` binary image labels.
        strata: ``(N,)`` real stratifying values.
        n_strata: number of quantile bins (>= 1).

    Returns:
        ``{"strata": [{"range": (lo, hi), "n_pos": int, "n_neg": int, "auroc": float}, ...], "mean": float}``;
        a stratum's ``auroc`` is ``nan`` when it lacks a class, ``mean`` averages the others (``nan`` if none).
    """
    if n_strata < 1:
        raise ValueError(f"n_strata must be >= 1, got {n_strata}.")
    s = as_finite_scores(scores, "scores").reshape(-1)
    y = as_binary(labels, "labels").reshape(-1)
    v = as_finite_scores(strata, "strata").reshape(-1)
    check_same_shape(s, y, "scores", "labels")
    check_same_shape(s, v, "scores", "strata")
    edges = np.quantile(v, np.linspace(0.0, 1.0, n_strata + 1))
    stratum_of = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, n_strata - 1)
    strata_out = []
    for k in range(n_strata):
        inside = stratum_of == k
        n_pos = int(y[inside].sum())
        n_neg = int(inside.sum()) - n_pos
        auroc = roc_auc(s[inside], y[inside]) if n_pos > 0 and n_neg > 0 else float("nan")
        strata_out.append(
            {"range": (float(edges[k]), float(edges[k + 1])), "n_pos": n_pos, "n_neg": n_neg, "auroc": auroc}
        )
    valid = [item["auroc"] for item in strata_out if not np.isnan(item["auroc"])]
    return {"strata": strata_out, "mean": float(np.mean(valid)) if valid else float("nan")}

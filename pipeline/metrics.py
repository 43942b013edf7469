"""Evaluation metrics for anomaly maps and slice scores: exact and streaming AUROC, AUPRO, best Dice, FROC-style lesion
sensitivity and area-stratified image AUROC.

numpy/scipy only, so that training validation, evaluation reports and ``compare`` can call them on CPU arrays without
torch. torch tensors (MetaTensor included) are accepted and converted at the boundary by :func:`as_numpy`.

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
from scipy.stats import rankdata

__all__ = [
    "as_numpy",
    "as_slices",
    "as_binary",
    "roc_auc",
    "roc_curve",
    "StreamingAUROC",
    "aupro",
    "best_dice",
    "lesion_sensitivity_at_fp",
    "image_auroc_by_strata",
]

# 8-connectivity inside each slice and no connection across slices, so one `ndimage.label` call labels a whole stack.
_IN_PLANE_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_8_CONNECTIVITY[1] = True

_DEFAULT_FROC_THRESHOLDS = 64


def as_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors (also on GPU or requiring grad) are detached and copied to CPU."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_slices(x: Any, name: str) -> np.ndarray:
    """Return a stack of 2D slices as an ``(N, H, W)`` numpy array.

    Args:
        x: ``(H, W)``, ``(N, H, W)`` or ``(N, 1, H, W)`` array or tensor.
        name: the argument's name, for the error message.

    Raises:
        ValueError: any other shape.
    """
    a = as_numpy(x)
    if a.ndim == 2:
        return a[None]
    if a.ndim == 3:
        return a
    if a.ndim == 4 and a.shape[1] == 1:
        return a[:, 0]
    raise ValueError(f"{name} must have shape (H, W), (N, H, W) or (N, 1, H, W), got {a.shape}.")


def as_binary(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a bool numpy array of the same shape.

    Raises:
        ValueError: values other than 0 and 1 (``name`` is the argument's name, for the message).
    """
    a = as_numpy(x)
    if a.dtype == bool:
        return a
    if np.any((a != 0) & (a != 1)):
        raise ValueError(f"{name} must be binary (bool or values in {{0, 1}}); binarise it first (e.g. `> 0.5`).")
    return a != 0


def _as_finite_scores(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a float64 numpy array (same shape), refusing NaN and infinite values."""
    a = as_numpy(x).astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return a


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}.")


def _scores_and_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flatten and validate a (scores, labels) pair; both classes must be present."""
    s = _as_finite_scores(scores, "scores").reshape(-1)
    y = as_binary(labels, "labels").reshape(-1)
    _check_same_shape(s, y, "scores", "labels")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(
            f"AUROC needs both classes, got {n_pos} positive and {y.size - n_pos} negative samples; "
            "it is undefined when only one class is present."
        )
    return s, y


def roc_auc(scores: Any, labels: Any) -> float:
    """Exact area under the ROC curve (Mann-Whitney U / (P * N), tied scores count 1/2 through average ranks).

    Equal to ``sklearn.metrics.roc_auc_score(labels, scores)``.

    Args:
        scores: any shape, real values, higher = more anomalous.
        labels: same number of elements, binary (1 = anomalous).

    Returns:
        AUROC in [0, 1].

    Raises:
        ValueError: only one class present, non-binary labels, non-finite scores or mismatched sizes.
    """
    s, y = _scores_and_labels(scores, labels)
    ranks = rankdata(s)  # average ranks: a positive tied with a negative wins half a pair
    n_pos = float(y.sum())
    n_neg = float(y.size) - n_pos
    u = ranks[y].sum() - n_pos * (n_pos + 1.0) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC curve, one point per distinct score (as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``).

    Args:
        scores: any shape, real values.
        labels: same number of elements, binary.

    Returns:
        ``(fpr, tpr, thresholds)``, float64 1D arrays of equal length. Point ``k`` predicts ``score >= thresholds[k]``;
        thresholds decrease, the first is ``+inf`` (point (0, 0)) and the last point is (1, 1).
    """
    s, y = _scores_and_labels(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_each_value = np.flatnonzero(np.diff(s) != 0)  # a threshold between two equal scores is not a ROC point
    ends = np.append(last_of_each_value, s.size - 1)
    tps = np.cumsum(y)[ends]
    fps = (ends + 1) - tps
    fpr = np.concatenate([[0.0], fps / fps[-1]])
    tpr = np.concatenate([[0.0], tps / tps[-1]])
    thresholds = np.concatenate([[np.inf], s[ends]])
    return fpr, tpr, thresholds


class StreamingAUROC:
    """AUROC over arbitrarily many pixels in O(n_bins) memory, from one score histogram per class.

    Scores are clipped to ``score_range`` and binned into ``n_bins`` equal bins. The binned AUROC counts a
    positive/negative pair 1 when the positive's bin is higher, 0 when lower and 1/2 when they share a bin. Binning is
    monotone, so only pairs that share a bin can differ from the exact (tie-aware) AUROC, where they count 0, 1/2 or 1.
    Hence the guarantee returned by :meth:`error_bound`::

        |binned AUROC - exact AUROC| <= 0.5 * sum_b pos_b * neg_b / (P * N)

    with ``pos_b``/``neg_b`` the bin counts and ``P``/``N`` the class totals. It holds for clipped scores too (they
    share an edge bin), and is 0 when no bin holds both classes. Scores that are bin centres (or otherwise one distinct
    value per bin) give the exact AUROC.

    Args:
        score_range: ``(low, high)``, the range that the bins cover; scores outside are clipped into it.
        n_bins: number of equal-width bins (2**16 by default: 1 MiB of counts).

    Example::

        metric = StreamingAUROC()
        for maps, masks, livers in batches:
            metric.update(maps, masks, mask=livers)  # liver pixels only
        auroc, bound = metric.compute(), metric.error_bound()
    """

    def __init__(self, score_range: tuple[float, float] = (0.0, 1.0), n_bins: int = 2**16) -> None:
        low, high = float(score_range[0]), float(score_range[1])
        if not (np.isfinite(low) and np.isfinite(high) and high > low):
            raise ValueError(f"score_range must be finite with low < high, got {score_range}.")
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
        self.score_range = (low, high)
        self.n_bins = int(n_bins)
        self.pos_hist = np.zeros(self.n_bins, dtype=np.int64)
        self.neg_hist = np.zeros(self.n_bins, dtype=np.int64)

    def reset(self) -> None:
        """Forget all pixels seen so far."""
        self.pos_hist[:] = 0
        self.neg_hist[:] = 0

    @property
    def counts(self) -> tuple[int, int]:
        """``(P, N)``: the number of positive and negative pixels seen so far."""
        return int(self.pos_hist.sum()), int(self.neg_hist.sum())

    def _bin_index(self, scores: np.ndarray) -> np.ndarray:
        low, high = self.score_range
        scaled = (np.clip(scores, low, high) - low) * (self.n_bins / (high - low))
        return np.minimum(scaled.astype(np.int64), self.n_bins - 1)  # score == high belongs to the top bin

    def update(self, scores: Any, labels: Any, mask: Any | None = None) -> None:
        """Add pixels to the histograms.

        Args:
            scores: any shape, real (NaN refused); higher = more anomalous.
            labels: same shape, binary (1 = anomalous pixel).
            mask: optional, same shape, binary: only pixels where it is 1 are counted (e.g. the liver).
        """
        s = _as_finite_scores(scores, "scores")
        y = as_binary(labels, "labels")
        _check_same_shape(s, y, "scores", "labels")
        if mask is not None:
            keep = as_binary(mask, "mask")
            _check_same_shape(s, keep, "scores", "mask")
            s, y = s[keep], y[keep]
        bins = self._bin_index(s.reshape(-1))
        y = y.reshape(-1)
        self.pos_hist += np.bincount(bins[y], minlength=self.n_bins)
        self.neg_hist += np.bincount(bins[~y], minlength=self.n_bins)

    def merge(self, other: StreamingAUROC) -> StreamingAUROC:
        """Add the counts of ``other`` (same range and bins), e.g. from another worker; returns ``self``."""
        if other.score_range != self.score_range or other.n_bins != self.n_bins:
            raise ValueError(
                f"cannot merge StreamingAUROC with range {other.score_range} and {other.n_bins} bins into one with "
                f"range {self.score_range} and {self.n_bins} bins."
            )
        self.pos_hist += other.pos_hist
        self.neg_hist += other.neg_hist
        return self

    def _totals(self) -> tuple[float, float]:
        n_pos, n_neg = self.counts
        if n_pos == 0 or n_neg == 0:
            raise ValueError(
                f"AUROC needs both classes, got {n_pos} positive and {n_neg} negative pixels; "
                "it is undefined when only one class is present."
            )
        return float(n_pos), float(n_neg)

    def compute(self) -> float:
        """The binned AUROC in [0, 1] (within :meth:`error_bound` of the exact one)."""
        n_pos, n_neg = self._totals()
        # float64: products of counts of tens of millions overflow nothing and lose nothing that matters
        pos = self.pos_hist.astype(np.float64)
        neg = self.neg_hist.astype(np.float64)
        neg_below = np.cumsum(neg) - neg
        return float(np.sum(pos * (neg_below + 0.5 * neg)) / (n_pos * n_neg))

    def error_bound(self) -> float:
        """Largest possible ``|compute() - exact AUROC|``: ``0.5 * sum_b pos_b * neg_b / (P * N)``."""
        n_pos, n_neg = self._totals()
        shared = np.sum(self.pos_hist.astype(np.float64) * self.neg_hist.astype(np.float64))
        return float(0.5 * shared / (n_pos * n_neg))

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ROC curve at the bin edges.

        Returns:
            ``(fpr, tpr, thresholds)``, float64 1D arrays of length ``n_bins + 1``; point ``k`` predicts positive every
            pixel in a bin whose lower edge is ``>= thresholds[k]``. Thresholds decrease from ``+inf`` (point (0, 0))
            to the range's low end (point (1, 1)).
        """
        n_pos, n_neg = self._totals()
        low, high = self.score_range
        lower_edges = low + (high - low) * np.arange(self.n_bins) / self.n_bins
        tps = np.cumsum(self.pos_hist[::-1])
        fps = np.cumsum(self.neg_hist[::-1])
        fpr = np.concatenate([[0.0], fps / n_neg])
        tpr = np.concatenate([[0.0], tps / n_pos])
        thresholds = np.concatenate([[np.inf], lower_edges[::-1]])
        return fpr, tpr, thresholds


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
    m = _as_finite_scores(as_slices(maps, "maps"), "maps")
    g = as_binary(as_slices(masks, "masks"), "masks")
    _check_same_shape(m, g, "maps", "masks")
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
    s = _as_finite_scores(scores, "scores").reshape(-1)
    y = as_binary(labels, "labels").reshape(-1)
    v = _as_finite_scores(strata, "strata").reshape(-1)
    _check_same_shape(s, y, "scores", "labels")
    _check_same_shape(s, v, "scores", "strata")
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


#: Pixels removed from the liver border for the "eroded liver" pixel AUROC: the liver edge (partial volume, the ROI
#: mask's own border, vessels entering) scores high for any map and can dominate an in-liver AUROC.
LIVER_EROSION_PX = 3


def erode(masks: Any, px: int = LIVER_EROSION_PX) -> np.ndarray:
    """Binary erosion of each 2D slice by ``px`` pixels (a (2 px + 1)^2 square, chessboard distance).

    In: ``(..., H, W)`` binary (numpy or torch). Out: bool numpy array of the same shape; pixels outside the image
    count as background, so a mask touching the image edge shrinks there too.
    """
    m = as_numpy(masks) > 0
    if px <= 0:
        return m
    flat = m.reshape(-1, *m.shape[-2:])
    square = np.ones((2 * px + 1, 2 * px + 1), dtype=bool)
    out = np.stack([ndimage.binary_erosion(s, structure=square, border_value=0) for s in flat])
    return out.reshape(m.shape)

"""Evaluation metrics on CPU arrays: coercion of scores and masks, exact and streaming AUROC / ROC, liver erosion.

numpy/scipy only, so that training validation, evaluation reports and ``compare`` can call them on CPU arrays without
torch. torch tensors (MetaTensor included) are accepted and converted at the boundary by :func:`as_numpy`. The
localisation metrics (AUPRO, best Dice, lesion sensitivity, area-stratified AUROC) build on these and live in
:mod:`pipeline.evaluate.localisation`.

Conventions shared by every function here:

- labels and masks are binary: bool or numbers in {0, 1}; anything else raises ``ValueError`` (binarise soft masks
  upstream, e.g. ``> 0.5`` after nearest resizing).
- a pixel is "detected" at threshold ``t`` when its score is strictly above ``t``.
- slice stacks are ``(N, H, W)``; ``(H, W)`` and ``(N, 1, H, W)`` are accepted and reshaped to that.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

__all__ = [
    "as_numpy",
    "as_slices",
    "as_binary",
    "as_finite_scores",
    "check_same_shape",
    "roc_auc",
    "roc_curve",
    "StreamingAUROC",
    "LIVER_EROSION_PX",
    "erode",
]


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


def as_finite_scores(x: Any, name: str) -> np.ndarray:
    """Return ``x`` (any shape, real) as a float64 numpy array of the same shape.

    Raises:
        ValueError: NaN or infinite values (``name`` is the argument's name, for the message).
    """
    a = as_numpy(x).astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return a


def check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` (naming ``name_a`` and ``name_b``) unless the two arrays have the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}.")


def _scores_and_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flatten and validate a (scores, labels) pair; both classes must be present."""
    s = as_finite_scores(scores, "scores").reshape(-1)
    y = as_binary(labels, "labels").reshape(-1)
    check_same_shape(s, y, "scores", "labels")
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
        s = as_finite_scores(scores, "scores")
        y = as_binary(labels, "labels")
        check_same_shape(s, y, "scores", "labels")
        if mask is not None:
            keep = as_binary(mask, "mask")
            check_same_shape(s, keep, "scores", "mask")
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

"""The evaluation's JSON report: localisation metrics, ROC points for plots and the confound baselines.

Beside the engine's AUROCs (:mod:`pipeline.evaluate.engine`) the report adds the localisation metrics (AUPRO, best
Dice, lesion sensitivity at fixed false positives per slice), the image AUROC within liver-area strata and the
image-level ROC curve points of the model and of the darkness baseline, all on exactly the evaluated slices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import

from networks.scoring import DEFAULT_SF, image_scores
from pipeline.common.files import atomic_write_json
from pipeline.evaluate.baselines import (
    baseline_report,
    darkness_map,
    smoothed_map,
    smoothing_sigma_px,
)
from pipeline.evaluate.localisation import aupro, best_dice, image_auroc_by_strata, lesion_sensitivity_at_fp
from pipeline.evaluate.metrics import StreamingAUROC, as_binary, as_slices, roc_curve

__all__ = ["FP_PER_SLICE", "roc_points", "aupro_in_region", "smoothed_pixel_auroc", "localisation_report",
           "EvaluationReport"]

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

#: mean false positives per slice at which lesion sensitivity is reported (the FROC curve's usual points)
FP_PER_SLICE = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def roc_points(scores: Any, labels: Any, max_points: int = 200) -> dict[str, list[float]] | None:
    """Image-level ROC curve for plotting: ``{"fpr": [...], "tpr": [...]}``, at most ``max_points`` points.

    In: ``scores`` ``(N,)`` real, ``labels`` ``(N,)`` binary. The exact curve (one point per distinct score) is thinned
    to points evenly spaced in its index, always keeping (0, 0) and (1, 1): between two kept points lie at most
    ``ceil(len / max_points)`` points of the exact curve. Returns None when only one class is present (no curve).
    """
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}.")
    y = np.asarray(labels).reshape(-1).astype(bool)
    if y.all() or not y.any():
        return None
    fpr, tpr, _ = roc_curve(scores, y)
    if fpr.size > max_points:
        keep = np.unique(np.round(np.linspace(0, fpr.size - 1, max_points)).astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def aupro_in_region(maps: Any, masks: Any, region: Any, max_fpr: float = 0.3) -> float:
    """AUPRO (:func:`pipeline.evaluate.localisation.aupro`) with the false positive rate counted inside ``region`` only.

    In: ``maps`` ``(N, H, W)`` real, ``masks`` and ``region`` ``(N, H, W)`` binary (mask pixels count as inside the
    region). Out: AUPRO in [0, 1] up to ``max_fpr`` of the region's negative pixels; NaN without a mask region or
    without a negative pixel in the region.

    ``aupro`` counts false positives over every pixel it is given. Pixels outside the region are set below every
    score inside it, so they are never above a threshold of the integrated range and only scale each FPR by
    ``c = region negatives / all negatives``: the region's AUPRO up to ``max_fpr`` is ``aupro`` up to ``max_fpr * c``.
    This matters for liver-only maps, whose zero background makes the all-pixel curve reach high PRO at a small FPR.
    """
    m = as_slices(maps, "maps").astype(np.float32)
    g = as_binary(as_slices(masks, "masks"), "masks")
    inside = as_binary(as_slices(region, "region"), "region") | g
    n_negatives, n_inside = int((~g).sum()), int((inside & ~g).sum())
    if n_inside == 0 or not g.any():
        return float("nan")
    below = np.where(inside, m, m.min() - 1.0)
    return aupro(below, g, max_fpr=max_fpr * n_inside / n_negatives)


def smoothed_pixel_auroc(maps: Any, lesions: Any, livers: Any, mm_per_pixel: float | None) -> float:
    """Pixel AUROC inside the liver of the maps after the ``deviation_smoothed`` baseline's own post-processing.

    The strongest trivial baseline on real CT is the deviation map Gaussian-smoothed by
    :data:`~pipeline.evaluate.baselines.SMOOTHING_MM` (:func:`~pipeline.evaluate.baselines.smoothed_map`); smoothing
    alone lifts a noisy map's pixel AUROC, so the model's map gets the same treatment for a like-for-like comparison.
    In: ``maps`` ``(N, H, W)`` in [0, 1], ``lesions`` and ``livers`` ``(N, H, W)`` binary, ``mm_per_pixel`` the slice
    pixel size (None: :data:`~pipeline.evaluate.baselines.DEFAULT_MM_PER_PIXEL`, as the baselines assume). Out: AUROC
    in [0, 1], NaN without both classes in the liver. The smoothing runs one slice at a time, so memory stays that of
    the maps.
    """
    m = as_slices(maps, "maps")
    liver = as_binary(as_slices(livers, "livers"), "livers")
    lesion = as_binary(as_slices(lesions, "lesions"), "lesions")
    sigma_px = smoothing_sigma_px(mm_per_pixel)
    metric = StreamingAUROC()
    for i in range(len(m)):
        metric.update(smoothed_map(m[i : i + 1], liver[i : i + 1], sigma_px), lesion[i : i + 1], mask=liver[i : i + 1])
    positives, negatives = metric.counts
    return metric.compute() if positives and negatives else float("nan")


def localisation_report(
    maps: Any,
    lesions: Any,
    livers: Any,
    scores: Any,
    labels: Any,
    max_fpr: float = 0.3,
    fp_per_slice: tuple[float, ...] = FP_PER_SLICE,
    n_froc_thresholds: int = 32,
) -> dict[str, Any]:
    """Metrics of the anomaly maps beyond AUROC, on one evaluated slice set.

    In: ``maps`` ``(N, H, W)`` real anomaly maps (as scored, e.g. zeroed outside the liver), ``lesions`` and ``livers``
    ``(N, H, W)`` binary, ``scores`` ``(N,)`` image scores, ``labels`` ``(N,)`` binary slice labels.

    Returns ``{"metrics": {"aupro", "aupro_liver", "best_dice", "best_dice_threshold", "image_auroc_area_matched"},
    "lesion_sensitivity_at_fp": {"0.125": ..., ...}, "image_auroc_by_liver_area": {...}, "image_roc": {...} | None}``:
    AUPRO up to ``max_fpr`` with the FPR over all pixels (MVTec AD / BMAD) and over liver pixels
    (:func:`aupro_in_region`); the best pooled Dice over 200 thresholds (an oracle threshold chosen on these slices: an
    upper bound, not a deployable operating point); lesion sensitivity at mean false positives per slice
    (``n_froc_thresholds`` thresholds, each one connected-component labelling of the stack); image AUROC inside 4
    liver-area quantile strata and their mean (the area-matched AUROC: near 0.5 if the score only tracks slice size);
    and the model's :func:`roc_points`. Undefined values (no lesion, one class) are NaN or None.
    """
    dice, threshold = best_dice(maps, lesions)
    liver_area = as_slices(livers, "livers").sum(axis=(1, 2))
    strata = image_auroc_by_strata(scores, labels, liver_area)
    sensitivity = lesion_sensitivity_at_fp(
        maps,
        lesions,
        threshold_grid=_inner_grid(maps, n_froc_thresholds),
        fp_rates=fp_per_slice,
    )
    return {
        "metrics": {
            "aupro": aupro(maps, lesions, max_fpr=max_fpr),
            "aupro_liver": aupro_in_region(maps, lesions, livers, max_fpr=max_fpr),
            "best_dice": dice,
            "best_dice_threshold": threshold,
            "image_auroc_area_matched": strata["mean"],
        },
        "lesion_sensitivity_at_fp": {f"{rate:g}": value for rate, value in sensitivity.items()},
        "image_auroc_by_liver_area": strata,
        "image_roc": roc_points(scores, labels),
    }


def _inner_grid(maps: Any, n: int) -> np.ndarray:
    """``n`` thresholds evenly spaced strictly inside the range of ``maps``."""
    low, high = float(np.min(maps)), float(np.max(maps))
    return np.linspace(low, high, n + 2)[1:-1]


class EvaluationReport:
    """Write the evaluation's metrics, per-slice scores and confound baselines to one JSON file when it completes.

    The baselines (liver area, liver intensity, random, darkness) are computed on exactly the evaluated slices, so
    the model's numbers always stand beside what trivial cues reach. Beside the engine's metrics the report holds
    :func:`localisation_report` (AUPRO, best Dice, lesion sensitivity at fixed false positives per slice, area-matched
    image AUROC) and ``image_roc`` (model and darkness-baseline ROC points for plots). The maps are kept in memory as
    float32 until the end (about 0.4 GB for 1,500 slices of 256 x 256).
    """

    def __init__(self, output_path: str, sf: int = DEFAULT_SF, split: str = "", extra: dict | None = None,
                 mm_per_pixel: float | None = None) -> None:
        self.output_path, self.sf, self.split, self.extra = Path(output_path), sf, split, extra or {}
        self.mm_per_pixel = mm_per_pixel

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Any) -> None:
        keys = ("image", "map", "liver", "lesion", "has_lesion", "score", "case_id", "slice_index")
        self._rows: dict[str, list] = {k: [] for k in keys}

    def _collect(self, engine: Any) -> None:
        out = engine.state.output
        self._rows["image"].append(out["image"].half())
        self._rows["map"].append(out["map"].float())
        self._rows["liver"].append(out["liver"].bool())
        self._rows["lesion"].append(out["lesion"].bool())
        self._rows["has_lesion"].append(out["has_lesion"].bool())
        self._rows["score"].append(image_scores(out["map"], self.sf))
        n = out["map"].shape[0]
        self._rows["case_id"] += out.get("case_id", [""] * n)
        self._rows["slice_index"] += out.get("slice_index", [-1] * n)

    def _write(self, engine: Any) -> None:
        images = torch.cat(self._rows["image"]).float().numpy()
        livers = torch.cat(self._rows["liver"]).numpy()
        lesions = torch.cat(self._rows["lesion"]).numpy()
        scores = torch.cat(self._rows["score"]).numpy()
        labels = torch.cat(self._rows["has_lesion"]).numpy()
        maps = torch.cat(self._rows["map"]).numpy()[:, 0]
        localisation = localisation_report(maps, lesions[:, 0], livers[:, 0], scores, labels)
        localisation["metrics"]["pixel_auroc_liver_smoothed"] = smoothed_pixel_auroc(
            maps, lesions[:, 0], livers[:, 0], self.mm_per_pixel
        )
        del maps  # the largest array; the baselines below need memory of their own
        darkness_scores = image_scores(darkness_map(images, livers), sf=self.sf)
        report = {
            "split": self.split,
            "n_slices": int(len(labels)),
            "n_lesion_slices": int(labels.sum()),
            "metrics": {k: _finite_or_none(v) for k, v in {**engine.state.metrics, **localisation["metrics"]}.items()},
            "lesion_sensitivity_at_fp": localisation["lesion_sensitivity_at_fp"],
            "image_auroc_by_liver_area": localisation["image_auroc_by_liver_area"],
            "image_roc": {"model": localisation["image_roc"], "darkness": roc_points(darkness_scores, labels)},
            "baselines": baseline_report(
                images, livers, lesions, sf=self.sf, labels=labels, darkness_scores=darkness_scores,
                case_ids=self._rows["case_id"], mm_per_pixel=self.mm_per_pixel,
            ),
            "slices": [
                {"case_id": c, "slice_index": int(i), "score": float(s), "has_lesion": bool(y)}
                for c, i, s, y in zip(self._rows["case_id"], self._rows["slice_index"], scores, labels)
            ],
            **self.extra,
        }
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.output_path, report)  # strict JSON: undefined (NaN) numbers become null


def _finite_or_none(v: Any) -> Any:
    """``v`` as a float, or None when NaN or infinite (strict JSON has no such numbers); non-numbers as they are."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if np.isfinite(f) else None

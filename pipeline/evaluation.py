"""Evaluation glue for MONAI's ignite workflows: the evaluation step, AUROC metrics and the JSON report.

Metrics follow the paper / BMAD conventions (REFERENCES.md B6): anomaly map = softmax of the lesion class; image
score = max of the sf x sf zero-padded mean-filtered map; pixel AUROC over all pixels of all slices (background
included) and, because the background makes that number easy, also inside the liver only. The JSON report adds the
localisation metrics (AUPRO, best Dice, lesion sensitivity at fixed false positives per slice), the image AUROC within
liver-area strata and the image-level ROC curve points of the model and of the darkness baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import

from networks.scoring import DEFAULT_SF, image_scores
from pipeline.baselines import baseline_report, box_mean_max, darkness_map
from pipeline.io import atomic_write_json
from pipeline.metrics import (
    StreamingAUROC,
    as_binary,
    as_slices,
    aupro,
    best_dice,
    erode,
    image_auroc_by_strata,
    lesion_sensitivity_at_fp,
    roc_auc,
    roc_curve,
)
from pipeline.training import unwrap

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")


class DetectorEvalStep:
    """``iteration_update`` for ``SupervisedEvaluator``: the anomaly map of clean slices.

    Reads ``image`` (B, 1, H, W) in [0, 1], ``liver`` and ``lesion`` (B, 1, H, W) {0, 1} from the batch. With
    ``liver_only`` (default) the map is zeroed outside the liver: the model is only asked about the liver.
    Returns ``{"map", "image", "liver", "lesion"}`` as CPU float tensors (B, 1, H, W), ``has_lesion`` (B,), plus
    ``case_id`` and ``slice_index`` when the batch has them.
    """

    def __init__(self, liver_only: bool = True) -> None:
        self.liver_only = liver_only

    def __call__(self, engine: Any, batch: dict) -> dict:
        device = engine.state.device
        image = torch.as_tensor(batch["image"]).to(device)
        net = unwrap(engine.network)
        net.eval()
        with torch.no_grad(), torch.autocast(device.type, enabled=bool(engine.amp)):
            amap = net.anomaly_map(image).float()
        out = {"map": amap.cpu(), "image": image.float().cpu()}
        out["liver"], out["lesion"] = (torch.as_tensor(batch[k]).float().cpu() for k in ("liver", "lesion"))
        # The slice label comes from the native-resolution count when the manifest has it: a 3 mm lesion can vanish
        # from a coarse ROI grid but the slice still shows a lesion.
        has = batch.get("has_lesion")
        out["has_lesion"] = (
            torch.as_tensor(has).float().flatten().cpu() if has is not None else out["lesion"].flatten(1).amax(dim=1)
        )
        if self.liver_only:
            out["map"] = out["map"] * out["liver"]
        for key in ("case_id", "slice_index"):
            if key in batch:
                out[key] = list(batch[key]) if not torch.is_tensor(batch[key]) else batch[key].tolist()
        return out


def _gather(x: torch.Tensor) -> torch.Tensor:
    return idist.all_gather(x) if idist.get_world_size() > 1 else x


class ImageAUROC(Metric):
    """Slice-level AUROC of ``image_scores(map, sf)`` against "slice has a lesion" (ranks across all processes)."""

    required_output_keys = ("map", "has_lesion")  # picked from the DetectorEvalStep output dict

    def __init__(self, sf: int = DEFAULT_SF, output_transform=lambda x: x, device: str | torch.device = "cpu") -> None:
        self.sf = sf
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        amap, has_lesion = output
        self._scores.append(image_scores(amap, self.sf).double().cpu())
        self._labels.append(has_lesion.double().cpu())

    def compute(self) -> float:
        scores = _gather(torch.cat(self._scores)) if self._scores else torch.zeros(0)
        labels = _gather(torch.cat(self._labels)) if self._labels else torch.zeros(0)
        if labels.numel() == 0 or labels.min() == labels.max():
            return float("nan")  # one class only: undefined, never silently 0.5
        return roc_auc(scores.numpy(), labels.numpy())


class PixelAUROC(Metric):
    """Pixel AUROC of the map against the lesion mask, over ``region`` = ``"all"`` pixels, ``"liver"`` only or
    ``"liver_eroded"`` (the liver shrunk by :data:`~pipeline.metrics.LIVER_EROSION_PX` pixels: without its border).

    Streams into histograms (:class:`~pipeline.metrics.StreamingAUROC`), so memory does not grow with the data; the
    histograms are summed across processes.
    """

    required_output_keys = ("map", "liver", "lesion")

    def __init__(self, region: str = "all", output_transform=lambda x: x, device: str | torch.device = "cpu") -> None:
        if region not in ("all", "liver", "liver_eroded"):
            raise ValueError(f"region must be 'all', 'liver' or 'liver_eroded', got {region!r}")
        self.region = region
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._auroc = StreamingAUROC()

    def update(self, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        amap, liver, lesion = output
        mask = None
        if self.region == "liver":
            mask = liver.numpy() > 0
        elif self.region == "liver_eroded":
            mask = erode(liver.numpy())
        self._auroc.update(amap.numpy(), lesion.numpy() > 0, mask=mask)

    def compute(self) -> float:
        if idist.get_world_size() > 1:
            for name in ("pos_hist", "neg_hist"):
                hist = torch.as_tensor(getattr(self._auroc, name))
                setattr(self._auroc, name, idist.all_reduce(hist).numpy())
        positives, negatives = self._auroc.counts
        return self._auroc.compute() if positives and negatives else float("nan")


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
    """AUPRO (:func:`pipeline.metrics.aupro`) with the false positive rate counted inside ``region`` only.

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
        del maps  # the largest array; the baselines below need memory of their own
        darkness_scores = box_mean_max(darkness_map(images, livers), sf=self.sf)
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
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if np.isfinite(f) else None

"""The evaluation step and the AUROC metrics of MONAI's ignite workflows (``SupervisedEvaluator``).

Metrics follow the paper / BMAD conventions (REFERENCES.md B6): anomaly map = softmax of the lesion class; image
score = max of the sf x sf zero-padded mean-filtered map (:func:`networks.scoring.image_scores`); pixel AUROC over all
pixels of all slices (background included) and, because the background makes that number easy, also inside the liver
only. Both metrics gather or sum across processes, so a multi-GPU evaluation reports the numbers of the whole split.
The JSON report written at the end of an evaluation is :class:`pipeline.evaluate.report.EvaluationReport`.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from networks.scoring import DEFAULT_SF, image_scores
from pipeline.common.wrappers import unwrap
from pipeline.evaluate.baselines import smoothed_map, smoothing_sigma_px
from pipeline.evaluate.metrics import StreamingAUROC, erode, roc_auc
from transforms.context import centre_channel

__all__ = ["DetectorEvalStep", "ImageAUROC", "PixelAUROC"]

Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")


class DetectorEvalStep:
    """``iteration_update`` for ``SupervisedEvaluator``: the anomaly map of clean slices.

    Reads ``image`` (B, 1, H, W) in [0, 1] (or a 2.5D stack (B, C, H, W), :mod:`transforms.context`), ``liver``
    and ``lesion`` (B, 1, H, W) {0, 1} from the batch. With ``liver_only`` (default) the map is zeroed outside the
    liver: the model is only asked about the liver. Returns ``{"map", "image", "liver", "lesion"}`` as CPU float
    tensors (B, 1, H, W) (``image``: a stack's middle slice), ``has_lesion`` (B,), plus ``case_id`` and
    ``slice_index`` when the batch has them.
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
        out = {"map": amap.cpu(), "image": centre_channel(image).float().cpu()}  # a 2.5D stack: its own slice
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
    """``x`` of every process concatenated along dim 0; a single process (no process group) keeps its own."""
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
    """Pixel AUROC of the map against the lesion mask, over ``region`` = ``"all"`` pixels, ``"liver"`` only,
    ``"liver_eroded"`` (the liver shrunk by :data:`~pipeline.evaluate.metrics.LIVER_EROSION_PX` pixels: without its
    border) or ``"liver_smoothed"`` (inside the liver, of the map after the ``deviation_smoothed`` baseline's
    :data:`~pipeline.evaluate.baselines.SMOOTHING_MM` Gaussian at ``mm_per_pixel``: the report's
    ``pixel_auroc_liver_smoothed``, like for like with that baseline, here per validation in the learning curve).

    Streams into histograms (:class:`~pipeline.evaluate.metrics.StreamingAUROC`), so memory does not grow with the
    data; the histograms are summed across processes.
    """

    required_output_keys = ("map", "liver", "lesion")

    REGIONS = ("all", "liver", "liver_eroded", "liver_smoothed")

    def __init__(self, region: str = "all", output_transform=lambda x: x, device: str | torch.device = "cpu",
                 mm_per_pixel: float | None = None) -> None:
        if region not in self.REGIONS:
            raise ValueError(f"region must be one of {self.REGIONS}, got {region!r}")
        self.region = region
        self.sigma_px = smoothing_sigma_px(mm_per_pixel)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._auroc = StreamingAUROC()

    def update(self, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        amap, liver, lesion = output
        scores, mask = amap.numpy(), None
        if self.region in ("liver", "liver_smoothed"):
            mask = liver.numpy() > 0
        elif self.region == "liver_eroded":
            mask = erode(liver.numpy())
        if self.region == "liver_smoothed":  # (B, 1, H, W) -> (B, H, W), as the report's smoothed_pixel_auroc
            scores, mask = smoothed_map(scores[:, 0], mask[:, 0], self.sigma_px), mask[:, 0]
            lesion = lesion[:, 0]
        self._auroc.update(scores, lesion.numpy() > 0, mask=mask)

    def compute(self) -> float:
        if idist.get_world_size() > 1:
            for name in ("pos_hist", "neg_hist"):
                hist = torch.as_tensor(getattr(self._auroc, name))
                setattr(self._auroc, name, idist.all_reduce(hist).numpy())
        positives, negatives = self._auroc.counts
        return self._auroc.compute() if positives and negatives else float("nan")

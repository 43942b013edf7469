"""Evaluation glue for MONAI's ignite workflows: the evaluation step, AUROC metrics and the JSON report.

Metrics follow the paper / BMAD conventions (REFERENCES.md B6): anomaly map = softmax of the lesion class; image
score = max of the sf x sf zero-padded mean-filtered map; pixel AUROC over all pixels of all slices (background
included) and, because the background makes that number easy, also inside the liver only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import

from networks.scoring import image_scores
from pipeline.baselines import baseline_report
from pipeline.io import atomic_write_json
from pipeline.metrics import StreamingAUROC, roc_auc
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

    def __init__(self, sf: int = 21, output_transform=lambda x: x, device: str | torch.device = "cpu") -> None:
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
    """Pixel AUROC of the map against the lesion mask, over ``region`` = ``"all"`` pixels or ``"liver"`` only.

    Streams into histograms (:class:`~pipeline.metrics.StreamingAUROC`), so memory does not grow with the data; the
    histograms are summed across processes.
    """

    required_output_keys = ("map", "liver", "lesion")

    def __init__(self, region: str = "all", output_transform=lambda x: x, device: str | torch.device = "cpu") -> None:
        if region not in ("all", "liver"):
            raise ValueError(f"region must be 'all' or 'liver', got {region!r}")
        self.region = region
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._auroc = StreamingAUROC()

    def update(self, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        amap, liver, lesion = output
        mask = liver.numpy() > 0 if self.region == "liver" else None
        self._auroc.update(amap.numpy(), lesion.numpy() > 0, mask=mask)

    def compute(self) -> float:
        if idist.get_world_size() > 1:
            for name in ("pos_hist", "neg_hist"):
                hist = torch.as_tensor(getattr(self._auroc, name))
                setattr(self._auroc, name, idist.all_reduce(hist).numpy())
        positives, negatives = self._auroc.counts
        return self._auroc.compute() if positives and negatives else float("nan")


class EvaluationReport:
    """Write the evaluation's metrics, per-slice scores and confound baselines to one JSON file when it completes.

    The baselines (liver area, liver intensity, random, darkness) are computed on exactly the evaluated slices, so
    the model's numbers always stand beside what trivial cues reach.
    """

    def __init__(self, output_path: str, sf: int = 21, split: str = "", extra: dict | None = None) -> None:
        self.output_path, self.sf, self.split, self.extra = Path(output_path), sf, split, extra or {}

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Any) -> None:
        keys = ("image", "liver", "lesion", "has_lesion", "score", "case_id", "slice_index")
        self._rows: dict[str, list] = {k: [] for k in keys}

    def _collect(self, engine: Any) -> None:
        out = engine.state.output
        self._rows["image"].append(out["image"].half())
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
        report = {
            "split": self.split,
            "n_slices": int(len(labels)),
            "n_lesion_slices": int(labels.sum()),
            "metrics": {k: _finite_or_none(v) for k, v in engine.state.metrics.items()},
            "baselines": baseline_report(images, livers, lesions, sf=self.sf, labels=labels),
            "slices": [
                {"case_id": c, "slice_index": int(i), "score": float(s), "has_lesion": bool(y)}
                for c, i, s, y in zip(self._rows["case_id"], self._rows["slice_index"], scores, labels)
            ],
            **self.extra,
        }
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.output_path, json.loads(json.dumps(report, default=_json_default)))


def _finite_or_none(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if np.isfinite(f) else None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return np.asarray(obj).tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")

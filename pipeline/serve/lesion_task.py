"""MONAI Label infer task: a CT volume and its liver label map in, the lesion mask on the CT's own grid out.

It wraps :func:`pipeline.infer.volume.infer_volume` (the one whole-volume inference of the project) for MONAI Label's
``/infer`` endpoint. Needs ``monailabel``, so it is only importable in the label environment (``make label-env``).
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from networks.scoring import DEFAULT_SF
from pipeline.data.datasets import PRESETS, resolve_preset
from pipeline.data.settings import prepare_settings_from_json
from pipeline.evaluate.baselines import darkness_map
from pipeline.infer.settings import load_detector, read_inference_settings, recorded_slice_context
from pipeline.infer.volume import infer_volume
from transforms.errors import InputDataError

__all__ = ["LESION_LABELS", "DarknessBaseline", "BASELINES", "import_callable", "missing_liver_label",
           "LiverLesionInferTask"]

LESION_LABELS = {"lesion": 1}
# report keys that name temporary files of the server or repeat the request: left out of the result JSON
_PRIVATE_REPORT_KEYS = ("outputs", "image", "label", "case_id")


class DarknessBaseline(torch.nn.Module):
    """The "darker = more anomalous" confound baseline (:func:`pipeline.evaluate.baselines.darkness_map`) as a detector.

    Served beside the model it shows what brightness alone finds; with no weights it is also the deterministic
    stand-in the server test uses. In: (B, 1, S, S) float in [0, 1], 0 outside the liver (the preprocessing masks
    it). Out: (B, 1, S, S) float in [0, 1], ``1 - image`` inside the liver, 0 outside.
    """

    def anomaly_map(self, image: torch.Tensor) -> torch.Tensor:
        """``1 - image`` where ``image > 0`` (the liver), else 0."""
        return darkness_map(image, image > 0)


BASELINES: dict[str, Callable[[], torch.nn.Module]] = {"darkness": DarknessBaseline}


def import_callable(spec: str) -> Callable[..., Any]:
    """The object named by ``"package.module:attribute"`` (e.g. a detector class or factory)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected 'package.module:attribute', got {spec!r}.")
    return getattr(importlib.import_module(module_name), attribute)


def missing_liver_label(image: str | os.PathLike | None, label_tag: str, label_preset: str) -> InputDataError:
    """The error for a request without a liver label: what is missing and the two ways to provide it."""
    image_id = os.path.basename(str(image)) if image else "the image"
    values = PRESETS[label_preset]
    return InputDataError(
        image,
        "no liver label for this image: the detector looks for lesions only inside the liver, so it needs the "
        "liver label map on the CT's grid.",
        f"upload it with the request (POST /infer/<model>?image=<id> with a form field label=@liver.nii.gz), or "
        f"store it as the image's {label_tag!r} label in the datastore (PUT /datastore/label?image=<id>&tag="
        f"{label_tag}, i.e. <studies>/labels/{label_tag}/<id>.nii.gz for {image_id}). Label values: preset "
        f"{label_preset!r}, liver {list(values.liver_values)}, lesion {list(values.lesion_values)} (set another "
        f"with params {{\"label_preset\": NAME}}, one of {sorted(PRESETS)}).",
    )


class LiverLesionInferTask(InferTask):
    """Whole-volume liver lesion detection as a MONAI Label segmentation model.

    Request keys (MONAI Label puts the image path in ``image`` and an uploaded ``label`` form file in ``label``):

    - ``image``: CT NIfTI in Hounsfield units, any axis-aligned orientation, shape (X, Y, Z).
    - ``label``: liver label map on the same grid (integer values per ``label_preset``; lesion values count as
      liver). Required; without it the call raises :class:`InputDataError` saying how to provide it.
    - ``threshold`` (optional float in [0, 1]) and ``label_preset`` (optional name) override the defaults.

    Returns ``(path, result)``: ``path`` a temporary ``.nii.gz`` (the caller deletes it; MONAI Label does) holding
    the lesion mask, uint8 {0, 1} (label "lesion" = 1), shape and affine of the input CT: heatmap >= threshold inside
    the liver, 3D components under ``min_lesion_mm3`` removed. ``result`` is the JSON report of
    :func:`pipeline.infer.volume.infer_volume` (volume score, lesion candidates with voxel/world centroids, per-slice
    scores, settings) without the server's temporary paths, plus ``label_names``.

    Args:
        bundle: bundle root holding ``models/model.pt`` and ``models/inference.json`` (written by training:
            architecture, preprocessing and the validation-chosen threshold).
        detector: optional, instead of the bundle's weights (the bundle still gives preprocessing and threshold):
            a name in :data:`BASELINES` (``"darkness"``) or ``"package.module:callable"`` returning a module with
            ``anomaly_map((B, 1, S, S) in [0, 1]) -> (B, 1, S, S) in [0, 1]``.
        threshold: decision threshold; None: the bundle's.
        label_preset: default label values of the liver label map (see :data:`pipeline.data.datasets.PRESETS`).
        min_lesion_mm3: lesion candidates smaller than this are dropped.
        liver_label_tag: the datastore label tag the app reads the liver label from (named in the missing-label
            error).
        device: where the detector runs; None: ``cuda`` when available, else ``cpu``.

    Raises:
        InputDataError: no weights in ``bundle``, or no threshold in the bundle nor given.
    """

    def __init__(
        self,
        bundle: str | os.PathLike,
        detector: str | None = None,
        threshold: float | None = None,
        label_preset: str = "lits",
        min_lesion_mm3: float = 100.0,
        liver_label_tag: str = "liver",
        device: str | None = None,
    ) -> None:
        bundle_settings = read_inference_settings(bundle)
        threshold = threshold if threshold is not None else bundle_settings.get("threshold")
        if threshold is None:
            raise InputDataError(bundle, "the bundle holds no lesion threshold (models/inference.json is missing or "
                                         "training found no validation lesion to choose one).",
                                 "start the server with --conf threshold T (a heatmap value in [0, 1]).")
        resolve_preset(label_preset)  # fail at start-up, not at the first request, on an unknown name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if detector in BASELINES:
            self.detector = BASELINES[detector]()
        elif detector:
            self.detector = import_callable(detector)()
        else:
            self.detector = load_detector(bundle, device=self.device)
        self.settings = prepare_settings_from_json(bundle_settings.get("prepare_settings"))
        self.sf = int(bundle_settings.get("sf", DEFAULT_SF))
        self.slice_context = recorded_slice_context(bundle_settings)
        self.min_lesion_mm3 = float(min_lesion_mm3)
        self.liver_label_tag = liver_label_tag
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=dict(LESION_LABELS),
            dimension=3,
            description="Liver lesions as anomalies of normal liver CT (needs the liver label map); returns the "
            "lesion mask on the CT's grid",
            config={"threshold": float(threshold), "label_preset": label_preset},
        )

    def is_valid(self) -> bool:
        """Always servable: the detector is loaded (or failed loudly) at construction."""
        return True

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict]:
        """Run one request (see the class docstring); return the lesion mask file and the JSON result."""
        params = {**self.config(), **request}
        image, label = params.get("image"), params.get("label")
        label_preset = str(params["label_preset"])
        try:
            values = resolve_preset(label_preset)
        except ValueError as exc:
            raise InputDataError(label, str(exc), "give a known label_preset.") from exc
        if not isinstance(image, str) or not os.path.isfile(image):
            raise InputDataError(image if isinstance(image, str) and image else None,
                                 "no CT image: the image id is not in the datastore and no file was uploaded.",
                                 "give the id of a datastore image (GET /datastore/?output=all lists them) or "
                                 "upload the CT as the form field file.")
        if not label:
            raise missing_liver_label(image, self.liver_label_tag, label_preset)
        try:
            threshold = float(params["threshold"])
        except (TypeError, ValueError) as exc:
            raise InputDataError(None, f"threshold must be a number, got {params['threshold']!r}.") from exc

        with tempfile.TemporaryDirectory(prefix="hepafair_label_") as work:
            report = infer_volume(
                image, label, self.detector, liver_values=values.liver_values, lesion_values=values.lesion_values,
                settings=self.settings, threshold=threshold, min_lesion_mm3=self.min_lesion_mm3, device=self.device,
                out_dir=work, case_id="case", sf=self.sf, slice_context=self.slice_context,
            )
            handle, result_path = tempfile.mkstemp(prefix="lesions_", suffix=".nii.gz")
            os.close(handle)
            shutil.move(report["outputs"]["lesions"], result_path)
        result = {k: v for k, v in report.items() if k not in _PRIVATE_REPORT_KEYS}
        result["label_names"] = dict(LESION_LABELS)
        return result_path, result

"""MONAI Label app serving the liver lesion detector of ``bundles/liver_ct_anomaly_detection``.

A bundle-only app (``monaibundle`` with ``BundleInferTask``) cannot serve this model: the detector needs the
liver label map next to the CT, and ``BundleInferTask`` passes the image alone. This app reads the liver label from
the request (an uploaded ``label`` form file) or else from the datastore (the image's ``final`` label,
``<studies>/labels/final/<image id>.nii.gz``, MONAI Label's own label store), and runs
:func:`pipeline.inference.infer_volume` through :class:`lesion_task.LiverLesionInferTask`. It returns the lesion mask
(uint8 {0, 1}, label "lesion" = 1) on the input CT's grid. No training task: the detector trains on normal scans
with the bundle's own ``train.yaml``, not on annotations.

Run it in the label environment (``make label-env``), from the repository root, offline::

    .venv-label/bin/python -m monailabel.main start_server --app pipeline/label_app --studies STUDIES \\
        --conf bundle bundles/liver_ct_anomaly_detection --host 127.0.0.1 --port 8000

``--conf`` keys (all optional): ``bundle`` (bundle root with ``models/model.pt`` and ``models/inference.json``;
default: this repository's bundle folder), ``detector`` (instead of the bundle's weights: ``darkness``, the confound
baseline, or ``package.module:callable``), ``threshold``, ``label_preset`` (values of the liver label map, default
``lits``: liver 1, lesion 2), ``liver_label_tag`` (default ``final``), ``min_lesion_mm3`` (default 100), ``device``,
``model_name`` (default ``liver_ct_anomaly_detection``). The bundle's docs/README.md has the details.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from lesion_task import LiverLesionInferTask
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask

import pipeline
from transforms.errors import InputDataError

logger = logging.getLogger(__name__)

# found through the installed project, not this file, so a copy of the app folder elsewhere finds it too
DEFAULT_BUNDLE = Path(pipeline.__file__).resolve().parents[1] / "bundles" / "liver_ct_anomaly_detection"
DEFAULT_MODEL_NAME = "liver_ct_anomaly_detection"


class HepafairLabelApp(MONAILabelApp):
    """MONAI Label app with one infer task, :class:`lesion_task.LiverLesionInferTask`; conf keys in the module doc.

    Bad input (no liver label, unreadable or mismatched NIfTI files, a bad parameter) answers HTTP 422 with the
    :class:`InputDataError` message, which names the file, the problem and the fix.
    """

    def __init__(self, app_dir: str, studies: str, conf: Mapping[str, str]) -> None:
        self.model_name = conf.get("model_name", DEFAULT_MODEL_NAME)
        self.liver_label_tag = conf.get("liver_label_tag", "final")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=dict(conf),
            name="hepafair liver lesion detection",
            description="Liver lesions found as anomalies by a detector trained on normal liver CT only",
            version="0.1.0",
        )

    def init_infers(self) -> dict[str, InferTask]:
        """The lesion task, configured from ``--conf`` (see the module docstring)."""
        conf = self.conf
        threshold = conf.get("threshold")
        task = LiverLesionInferTask(
            bundle=conf.get("bundle", str(DEFAULT_BUNDLE)),
            detector=conf.get("detector") or None,
            threshold=None if threshold is None else float(threshold),
            label_preset=conf.get("label_preset", "lits"),
            min_lesion_mm3=float(conf.get("min_lesion_mm3", 100.0)),
            liver_label_tag=self.liver_label_tag,
            device=conf.get("device") or None,
        )
        logger.info(f"hepafair: serving {self.model_name!r} on {task.device}, threshold {task.config()['threshold']}")
        return {self.model_name: task}

    def infer(self, request: Mapping[str, Any], datastore: Datastore | None = None) -> dict:
        """MONAI Label's infer, with the liver label taken from the datastore when the request brings none."""
        request = dict(request)
        image = request.get("image")
        # a string that is not a file is a datastore image id (MONAI Label's own rule in MONAILabelApp.infer)
        if not request.get("label") and isinstance(image, str) and not os.path.exists(image):
            store = datastore or self.datastore()
            label_id = store.get_label_by_image_id(image, self.liver_label_tag)
            if label_id:
                request["label"] = store.get_label_uri(label_id, self.liver_label_tag)
        try:
            return super().infer(request, datastore)
        except InputDataError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc

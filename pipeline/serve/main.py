"""MONAI Label app serving the liver lesion detector of ``bundles/liver_ct_anomaly_detection``.

A bundle-only app (``monaibundle`` with ``BundleInferTask``) cannot serve this model: the detector needs the
liver label map next to the CT, and ``BundleInferTask`` passes the image alone. This app reads the liver label from
the request (an uploaded ``label`` form file) or else from the datastore (the image's ``liver`` label,
``<studies>/labels/liver/<image id>.nii.gz``, MONAI Label's own label store), and runs
:func:`pipeline.infer.volume.infer_volume` through :class:`lesion_task.LiverLesionInferTask`. It returns the
lesion mask
(uint8 {0, 1}, label "lesion" = 1) on the input CT's grid. No training task: the detector trains on normal scans
with the bundle's own ``train.yaml``, not on annotations.

Run it in the label environment (``make label-env``), from the repository root, offline::

    .venv-label/bin/python -m monailabel.main start_server --app pipeline/serve --studies STUDIES \\
        --conf bundle bundles/liver_ct_anomaly_detection --host 127.0.0.1 --port 8000

``--conf`` keys (all optional): ``bundle`` (bundle root with ``models/model.pt`` and ``models/inference.json``;
default: this repository's bundle folder), ``detector`` (instead of the bundle's weights: ``darkness``, the confound
baseline, or ``package.module:callable``), ``threshold``, ``label_preset`` (values of the liver label map, default
``lits``: liver 1, lesion 2), ``liver_label_tag`` (default ``liver``), ``min_lesion_mm3`` (default 100), ``device``,
``model_name`` (default ``liver_ct_anomaly_detection``). The bundle's docs/README.md has the details.

Safety. The liver label never lives under ``final`` (or ``original``): ``final`` is where 3D Slicer's "Submit Label"
stores what a user sends back, i.e. the *lesion* masks this app returns; reading one as a liver mask would make every
later inference look only inside old lesions. A request may name datastore image ids only: the ``image`` and ``label``
values (query or ``params``) must be a datastore id or the server's own temporary copy of a file uploaded with the
same request, never another path on the server's disk. Bad requests (unknown model, malformed ``params`` JSON, a
threshold that is not a number in [0, 1], bad files) answer HTTP 4xx before any inference runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
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
DEFAULT_LIVER_LABEL_TAG = "liver"
# MONAI Label's own tags: "final" holds what users submit (here: lesion masks), "original" its first versions
FORBIDDEN_LIVER_TAGS = ("final", "original")
# how MONAI Label names the server-side copy of an uploaded file (tempfile.NamedTemporaryFile(suffix=ext).name)
_UPLOAD_NAME = re.compile(r"tmp[a-z0-9_]{8}(\.[A-Za-z0-9]+)*")


def is_upload_copy(value: str) -> bool:
    """Whether ``value`` is the server's temporary copy of a file uploaded with the request (a regular file named as
    MONAI Label names them, directly in the temporary folder), not some other path a client typed."""
    path = os.path.realpath(value)
    return (os.path.dirname(path) == os.path.realpath(tempfile.gettempdir())
            and _UPLOAD_NAME.fullmatch(os.path.basename(path)) is not None and os.path.isfile(path))


async def _malformed_params(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
    """MONAI Label parses the ``params`` form field before the app sees the request: answer 422, not 500."""
    return JSONResponse(status_code=422, content={"detail": f"params is not valid JSON ({exc.msg} at character "
                                                            f"{exc.pos}); send a JSON object, e.g. {{}}."})


def _answer_malformed_params_with_422() -> None:
    """Register :func:`_malformed_params` on MONAI Label's FastAPI server (when this app runs inside it)."""
    try:
        from monailabel.app import app as server
    except ImportError:  # the app used without the server (tests, scripts)
        return
    if json.JSONDecodeError not in server.exception_handlers:
        server.add_exception_handler(json.JSONDecodeError, _malformed_params)
        server.middleware_stack = None  # Starlette copies its handler table into the stack it builds once: rebuild


class HepafairLabelApp(MONAILabelApp):
    """MONAI Label app with one infer task, :class:`lesion_task.LiverLesionInferTask`; conf keys in the module doc.

    Bad input (no liver label, unreadable or mismatched NIfTI files, a bad parameter) answers HTTP 422 with the
    :class:`InputDataError` message, which names the file, the problem and the fix.
    """

    def __init__(self, app_dir: str, studies: str, conf: Mapping[str, str]) -> None:
        self.model_name = conf.get("model_name", DEFAULT_MODEL_NAME)
        self.liver_label_tag = conf.get("liver_label_tag", DEFAULT_LIVER_LABEL_TAG)
        if self.liver_label_tag in FORBIDDEN_LIVER_TAGS:
            raise ValueError(
                f"liver_label_tag {self.liver_label_tag!r} is a tag MONAI Label clients write results to (3D Slicer's "
                f"Submit Label stores the returned lesion masks under 'final'): keep the liver label under its own "
                f"tag, e.g. --conf liver_label_tag {DEFAULT_LIVER_LABEL_TAG}."
            )
        _answer_malformed_params_with_422()
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
        """MONAI Label's infer, after checking the request (model, ids, threshold), with the liver label taken from
        the datastore's ``liver_label_tag`` when the request uploads none."""
        request = dict(request)
        store = datastore or self.datastore()
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"no model {model!r}; this server has {sorted(self._infers)}.")
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise HTTPException(status_code=422, detail="no image: give a datastore image id (?image=<id>) or "
                                                        "upload the CT as the form field file.")
        if not is_upload_copy(image):
            if os.sep in image or image in (".", "..") or image not in set(store.list_images()):
                raise HTTPException(status_code=422, detail=f"image {image!r} is not an image id of this datastore "
                                    "(GET /datastore/?output=all lists them); a request cannot name server paths.")
        label = request.get("label")
        if label:
            if not isinstance(label, str) or not is_upload_copy(label):
                raise HTTPException(status_code=422, detail="label must be a file uploaded with the request (form "
                                    "field label); a request cannot name server paths.")
        elif not is_upload_copy(image):
            label_id = store.get_label_by_image_id(image, self.liver_label_tag)
            if label_id:
                request["label"] = store.get_label_uri(label_id, self.liver_label_tag)
        if "threshold" in request:
            threshold = request["threshold"]
            try:
                value = float(threshold)
            except (TypeError, ValueError):
                value = float("nan")
            if isinstance(threshold, bool) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise HTTPException(status_code=422, detail=f"threshold must be a number in [0, 1], got {threshold!r}.")
        try:
            return super().infer(request, datastore)
        except InputDataError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc

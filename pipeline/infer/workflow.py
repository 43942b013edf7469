"""The pieces of the bundle's inference workflow (``configs/inference.yaml``) that are not MONAI's own.

``preprocessing`` = :class:`LoadCased` (:func:`pipeline.common.io.load_case` as a transform) + :func:`recorded_volume_
transform` (the preprocessing training recorded in ``models/inference.json``); the ``inferer`` is
:class:`pipeline.infer.slices.SliceInferer`; ``postprocessing`` names its files with :func:`case_name_formatter`.
These are the objects :func:`pipeline.infer.volume.infer_volume` uses, so the workflow's heatmap is the CLI's.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.transforms import Compose, MapTransform

from pipeline.common.io import load_case
from pipeline.data.settings import prepare_settings_from_json, volume_transform
from pipeline.infer.paths import default_case_id, missing_label_error
from pipeline.infer.settings import read_inference_settings
from transforms.errors import InputDataError
from transforms.roi import LiverMasks

__all__ = ["LoadCased", "recorded_settings", "recorded_volume_transform", "case_name_formatter"]


class LoadCased(MapTransform):
    """Load a CT and its liver label map from paths, validated as :func:`pipeline.common.io.load_case` does.

    In: ``d[image_key]`` CT NIfTI (HU) or DICOM series folder, ``d[label_key]`` label NIfTI (or TotalSegmentator
    folder), ``d[series_uid_key]`` (optional) the series of a DICOM folder holding several. Out: the same dict with
    ``image`` and ``label`` replaced by ``load_case``'s (1, X, Y, Z) MetaTensors, and, when ``liver_key`` is given,
    ``d[liver_key]`` the (1, X, Y, Z) bool liver mask on the input grid (liver or lesion values: what
    :func:`~pipeline.infer.volume.infer_volume` zeroes the heatmap outside of).

    Raises :class:`InputDataError`: no image, no label (saying how to give one), or any problem ``load_case`` finds.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", liver_values: Sequence[int] = (1,),
                 lesion_values: Sequence[int] = (2,), liver_key: str | None = None,
                 series_uid_key: str = "series_uid") -> None:
        super().__init__([image_key, label_key])
        self.image_key, self.label_key, self.liver_key, self.series_uid_key = (image_key, label_key, liver_key,
                                                                                series_uid_key)
        self.masks = LiverMasks(liver_values, lesion_values)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        image, label = d.get(self.image_key), d.get(self.label_key)
        if image is None:
            raise InputDataError(None, "no CT image given.", "give --image CT (and --label LIVER), or a datalist of "
                                                             "{'image': CT, 'label': LIVER} entries.")
        if label is None:
            raise missing_label_error(image)
        loaded = load_case(image, label, self.masks.liver_values, self.masks.lesion_values,
                           d.get(self.series_uid_key) or None)
        d[self.image_key], d[self.label_key] = loaded["image"], loaded["label"]
        if self.liver_key is not None:
            d[self.liver_key] = self.masks.boolean(loaded["label"].as_tensor())[0]
        return d


def recorded_settings(bundle_root: str | os.PathLike) -> dict:
    """``<bundle_root>/models/inference.json`` as :func:`~pipeline.infer.settings.read_inference_settings` reads and
    checks it, or ``{}`` when the bundle has none (yet): then the defaults apply."""
    path = Path(bundle_root) / "models" / "inference.json"
    return read_inference_settings(path) if path.is_file() else {}


def recorded_volume_transform(bundle_root: str | os.PathLike, liver_values: Sequence[int],
                              lesion_values: Sequence[int]) -> Compose:
    """:func:`~pipeline.data.settings.volume_transform` with the ``prepare_settings`` training recorded in
    ``<bundle_root>/models/inference.json`` (the defaults without one): what ``python -m pipeline infer`` applies."""
    settings = prepare_settings_from_json(recorded_settings(bundle_root).get("prepare_settings"))
    return volume_transform(settings, liver_values, lesion_values)


def case_name_formatter(metadict: Mapping[str, Any] | None, saver: Any = None) -> dict:
    """``SaveImaged``'s ``output_name_formatter``: name outputs by the CLI's case id
    (:func:`~pipeline.infer.paths.default_case_id` of the image file), so ``output_postfix="anomaly"`` writes
    ``<case>_anomaly.nii.gz``. (MONAI's folder layout drops anything after a dot of the case id.)"""
    source = (metadict or {}).get("filename_or_obj")
    subject = default_case_id(source) if source else str(getattr(saver, "_data_index", 0))
    return {"subject": subject, "idx": None}

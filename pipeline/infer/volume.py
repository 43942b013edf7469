"""Whole-volume inference: a CT volume and its liver mask in, a lesion heatmap, a lesion mask and a report out.

The volume goes through exactly the preprocessing of ``prepare`` (:func:`pipeline.data.settings.volume_transform`:
orientation to RAS, HU window, liver ROI), the 2D detector runs on every liver slice of the ROI grid, and MONAI's
``Invertd`` puts the map back on the input's own voxel grid by undoing that same ``Compose``: the ROI crop
(:meth:`transforms.roi.LiverROId.inverse`: bilinear resampling to the native crop size, pasted at the crop box), then
the reorientation (``Orientationd.inverse``). Outputs, all on the input grid with the input's affine::

    OUT/<case>_anomaly.nii.gz   float32 heatmap in [0, 1], 0 outside the liver
    OUT/<case>_lesions.nii.gz   uint8 {0, 1}: heatmap >= threshold, 3D components smaller than min_lesion_mm3 removed
    OUT/<case>_report.json      volume and slice scores, lesion candidates (voxel and world coordinates), settings
    OUT/<case>_overlay.png      optional: the three highest-scoring slices with the heatmap over the CT

The decision threshold and the preprocessing settings come from ``<bundle>/models/inference.json``
(:mod:`pipeline.infer.settings`), written at the end of training by
:class:`pipeline.infer.threshold.ThresholdSelector`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from networks.scoring import DEFAULT_SF
from pipeline.common.files import atomic_write_json, ensure_output_dir
from pipeline.common.io import load_case, save_nifti
from pipeline.data.settings import PrepareSettings, volume_transform
from pipeline.infer.candidates import lesion_candidates
from pipeline.infer.overlay import write_overlay
from pipeline.infer.paths import check_outputs, default_case_id, missing_label_error, output_paths
from pipeline.infer.slices import SliceInferer, device_of, slice_spacing_mm
from transforms.context import SliceContext
from transforms.roi import LiverMasks

__all__ = ["REPORT_FORMAT", "infer_volume", "detect_slices", "to_input_grid", "orientation_to"]

REPORT_FORMAT = "hepafair-report/1"
OVERLAY_SLICES = 3


def infer_volume(
    image_path: str | os.PathLike, label_path: str | os.PathLike | None, detector: Any, *,
    liver_values: Sequence[int], lesion_values: Sequence[int] = (), settings: PrepareSettings, threshold: float,
    min_lesion_mm3: float = 100.0, batch_size: int = 16, device: str | torch.device | None = None,
    out_dir: str | os.PathLike, case_id: str | None = None, overwrite: bool = False, overlay: bool = False,
    series_uid: str | None = None, sf: int = DEFAULT_SF, slice_context: SliceContext | Mapping | None = None,
) -> dict:
    """Detect liver lesions in one CT volume; write heatmap, lesion mask, report (and overlay) to ``out_dir``.

    Args:
        image_path: CT NIfTI in Hounsfield units, any axis-aligned orientation, or a DICOM CT series folder (outputs
            are NIfTI on the grid reconstructed from it); ``series_uid`` picks one series of a folder holding several.
        label_path: label NIfTI on the same grid holding the liver (``liver_values``); lesion values (optional) count
            as liver. None raises an :class:`InputDataError` that says how to provide one.
        detector: a module with ``anomaly_map(image (B, 1, S, S) in [0, 1]) -> (B, 1, S, S) in [0, 1]``, e.g. from
            :func:`pipeline.infer.settings.load_detector`; run on ``device`` (None: where its parameters are, CPU
            for parameter-free modules), ``batch_size`` slices per call.
        settings: the preprocessing of training (``inference.json``'s ``prepare_settings``).
        threshold: heatmap value at and above which a voxel is a lesion candidate; candidates (3D connected
            components) smaller than ``min_lesion_mm3`` are dropped from the mask.
        out_dir: output folder (created); ``case_id`` names the outputs (default :func:`default_case_id` of the
            image); ``overwrite`` replaces existing outputs (never the inputs); ``overlay`` also writes the PNG.
        sf: mean-filter size of the slice scores (the bundle's ``inference.json`` ``sf``).
        slice_context: the detector's 2.5D input (the bundle's ``inference.json`` ``slice_context``); None: 2D.

    Returns the report written to ``<case>_report.json``: ``volume_score``, ``slices`` (per native slice index along
    ``slice_axis``), ``lesions`` (candidates, voxel/world centroids), ``outputs``, settings and timings. Raises
    :class:`InputDataError`: missing label, bad input files, or outputs that exist without ``overwrite``."""
    clock = _Stopwatch()
    if label_path is None:
        raise missing_label_error(image_path)
    image_path, label_path = Path(image_path), Path(label_path)
    case_id = case_id or default_case_id(image_path)
    paths = output_paths(ensure_output_dir(out_dir), case_id, overlay)
    check_outputs(paths, (image_path, label_path), overwrite)
    data = load_case(image_path, label_path, liver_values, lesion_values, series_uid)
    grid = _InputGrid.of(data, liver_values, lesion_values, settings.orientation)
    clock.lap("load")
    transform = volume_transform(settings, liver_values, lesion_values)
    vol = transform(data)
    grid.check_oriented(vol["roi"]["source_affine"])
    clock.lap("preprocess")
    detector, device = _on_device(detector, device)
    roi_map, scores, liver_slices = detect_slices(vol, detector, device, batch_size, sf, slice_context)
    clock.lap("detector")
    heatmap = to_input_grid(transform, vol, roi_map)
    heatmap *= grid.liver
    lesion_mask, candidates = lesion_candidates(heatmap, (heatmap >= threshold) & grid.liver, grid.affine,
                                                grid.slice_axis, min_lesion_mm3)
    clock.lap("invert")
    slices = grid.slice_entries(liver_slices, scores, vol["liver_voxels"])
    _write_outputs(paths, grid, heatmap, lesion_mask, slices, vol["roi"], settings.hu_window, threshold, overwrite)
    clock.lap("write")
    report = _report(
        case_id=case_id, image=image_path, label=label_path, series_uid=data["image"].meta.get("series_uid"),
        paths=paths, grid=grid, slices=slices, candidates=candidates, threshold=threshold,
        min_lesion_mm3=min_lesion_mm3, liver_values=liver_values, lesion_values=lesion_values, settings=settings,
        sf=sf, detector=detector, device=device, timings=clock.total(),
    )
    atomic_write_json(paths["report"], report)
    return report


class _Stopwatch:
    """Seconds per step (``lap``) and in all (``total``), rounded as the report shows them."""

    def __init__(self) -> None:
        self.start = self.clock = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.clock, 4)
        self.clock = now

    def total(self) -> dict[str, float]:
        self.timings["total"] = round(time.perf_counter() - self.start, 4)
        return self.timings


def orientation_to(native_affine: np.ndarray, native_shape: Sequence[int], axcodes: str,
                   oriented_affine: np.ndarray | None = None) -> np.ndarray:
    """The nibabel orientation transform native array -> ``axcodes`` array (what ``Orientationd`` applies).

    Given ``oriented_affine`` (the affine ``Orientationd`` produced), it is checked against it, so that the slice
    indices of the report and the overlay's view follow exactly the preprocessing's reorientation.
    """
    native_ornt = nib.orientations.io_orientation(native_affine)
    to_oriented = nib.orientations.ornt_transform(native_ornt, nib.orientations.axcodes2ornt(axcodes))
    expected = native_affine @ nib.orientations.inv_ornt_aff(to_oriented, tuple(native_shape))
    if oriented_affine is not None and not np.allclose(expected, oriented_affine, atol=1e-4):
        raise RuntimeError(
            f"the reoriented affine {np.round(oriented_affine, 4).tolist()} is not the nibabel reorientation "
            f"{np.round(expected, 4).tolist()} of the input affine; cannot map slices back to the input."
        )
    return to_oriented


@dataclass
class _InputGrid:
    """The input volume as inference needs it: affine, CT (HU), liver mask, and how its axes map to ``axcodes``."""

    affine: np.ndarray  # the input's own affine (the outputs get it)
    ct: np.ndarray  # (X, Y, Z) HU as stored
    liver: np.ndarray  # (X, Y, Z) bool: liver or lesion label values
    axcodes: str
    to_ras: np.ndarray  # nibabel orientation transform input -> axcodes

    @classmethod
    def of(cls, data: Mapping[str, Any], liver_values: Sequence[int], lesion_values: Sequence[int],
           axcodes: str) -> _InputGrid:
        affine = np.asarray(data["image"].meta["original_affine"], dtype=np.float64)
        ct = data["image"].as_tensor()[0].numpy()
        liver = LiverMasks(liver_values, lesion_values).boolean(data["label"].as_tensor()[0])[0].numpy()
        return cls(affine, ct, liver, axcodes, orientation_to(affine, ct.shape, axcodes))

    def check_oriented(self, oriented_affine: Any) -> None:
        """Check that preprocessing reoriented the volume as :attr:`to_ras` says (:func:`orientation_to`)."""
        orientation_to(self.affine, self.ct.shape, self.axcodes, np.asarray(oriented_affine))

    @property
    def slice_axis(self) -> int:
        """The input axis that becomes the oriented slice axis (nibabel's transform sends input axis i to oriented
        axis ``to_ras[i, 0]``, reversed when ``to_ras[i, 1]`` is -1)."""
        return int(np.flatnonzero(self.to_ras[:, 0] == 2)[0])

    def slice_entries(self, liver_slices: Sequence[int], scores: torch.Tensor, liver_voxels: Sequence[int]) -> list:
        """The report's per-slice entries: native and RAS slice index, slice score, native liver voxel count."""
        flipped = bool(self.to_ras[self.slice_axis, 1] < 0)
        n_native = self.ct.shape[self.slice_axis]
        return [
            {
                "slice_index": int(n_native - 1 - k if flipped else k),
                "ras_slice_index": int(k),
                "score": float(scores[k]),
                "liver_voxels": int(liver_voxels[k]),
            }
            for k in liver_slices
        ]


def _on_device(detector: Any, device: str | torch.device | None) -> tuple[Any, torch.device]:
    """``(detector, device)``: a module moved to ``device`` in eval mode; None: where its parameters are, else CPU."""
    device = device_of(detector, torch.device("cpu")) if device is None else torch.device(device)
    if isinstance(detector, torch.nn.Module):
        detector = detector.to(device).eval()
    return detector, device


def detect_slices(vol: Mapping[str, Any], detector: Any, device: torch.device, batch_size: int,
                  sf: int = DEFAULT_SF, slice_context: SliceContext | Mapping | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Run the detector on every liver slice of the ROI grid, ``batch_size`` slices at a time
    (:meth:`pipeline.infer.slices.SliceInferer.volume`, the bundle workflow's ``inferer``).

    In: ``vol`` as :func:`~pipeline.data.settings.volume_transform` returns it. Out: ``(roi_map, scores,
    liver_slices)``: the (S, S, Z) map, 0 outside the liver and on slices without liver; the (Z,) slice scores
    (:func:`networks.scoring.image_scores` with mean-filter size ``sf``); the indices of the liver slices.
    """
    liver_slices = np.flatnonzero(np.asarray(vol["liver_voxels"]) > 0)
    inferer = SliceInferer(batch_size, sf, device, slice_context)
    roi_map, scores = inferer.volume(vol["image"].as_tensor()[0], detector, torch.as_tensor(vol["liver"])[0],
                                     liver_slices, slice_spacing_mm(vol["image"].affine))
    return roi_map, scores, liver_slices


def to_input_grid(transform: Compose, vol: Mapping[str, Any], roi_map: torch.Tensor) -> np.ndarray:
    """A (S, S, Z) map on the ROI grid of ``vol["image"]``, back on the input grid through MONAI's ``Invertd``.

    ``transform`` is the ``Compose`` that made ``vol`` (its invertible steps, ``Orientationd`` and ``LiverROId``, are
    undone from the records in ``vol["image"].applied_operations``). Out: (X, Y, Z) float32 in Fortran order.
    """
    invert = Invertd("map", transform, orig_keys="image", nearest_interp=False)
    inverted = invert({"image": vol["image"], "map": MetaTensor(roi_map[None])})["map"]
    return np.asfortranarray(inverted.as_tensor()[0].numpy(), dtype=np.float32)


def _write_outputs(paths: Mapping[str, Path], grid: _InputGrid, heatmap: np.ndarray, lesion_mask: np.ndarray,
                   slices: Sequence[Mapping[str, Any]], roi: Mapping[str, Any], hu_window: Sequence[float],
                   threshold: float, overwrite: bool) -> None:
    """The heatmap and lesion mask NIfTI files, and the overlay PNG of the top-scoring slices when ``paths`` has one."""
    save_nifti(paths["anomaly"], heatmap, grid.affine, dtype=np.float32, overwrite=overwrite)
    save_nifti(paths["lesions"], lesion_mask.astype(np.uint8), grid.affine, dtype=np.uint8, overwrite=overwrite)
    if "overlay" in paths:
        top = sorted(((s["ras_slice_index"], s["score"]) for s in slices), key=lambda t: -t[1])[:OVERLAY_SLICES]
        spacing = np.linalg.norm(np.asarray(roi["source_affine"])[:3, :2], axis=0)
        write_overlay(paths["overlay"], grid.ct, heatmap, lesion_mask, grid.to_ras, spacing, top, hu_window,
                      threshold)


def _report(*, case_id: str, image: Path, label: Path, series_uid: Any, paths: Mapping[str, Path], grid: _InputGrid,
            slices: list[dict], candidates: list[dict], threshold: float, min_lesion_mm3: float,
            liver_values: Sequence[int], lesion_values: Sequence[int], settings: PrepareSettings, sf: int,
            detector: Any, device: torch.device, timings: dict[str, float]) -> dict:
    """The ``<case>_report.json`` document (see :func:`infer_volume`)."""
    return {
        "format": REPORT_FORMAT,
        "case_id": case_id,
        "image": str(image),
        "series_uid": series_uid,
        "label": str(label),
        "outputs": {k: str(p) for k, p in paths.items()},
        "shape": [int(n) for n in grid.ct.shape],
        "affine": grid.affine.tolist(),
        "spacing_mm": [float(s) for s in np.linalg.norm(grid.affine[:3, :3], axis=0)],
        "slice_axis": grid.slice_axis,
        "volume_score": float(max((s["score"] for s in slices), default=0.0)),
        "threshold": float(threshold),
        "min_lesion_mm3": float(min_lesion_mm3),
        "n_lesions": len(candidates),
        "lesions": candidates,
        "slices": slices,
        "liver_values": [int(v) for v in liver_values],
        "lesion_values": [int(v) for v in lesion_values],
        "settings": settings.to_json(),
        "slice_score_sf": int(sf),
        "detector": type(detector).__name__,
        "device": str(device),
        "timings_s": timings,
    }

"""Whole-volume inference: a CT volume and its liver mask in, a lesion heatmap, a lesion mask and a report out.

The volume goes through exactly the preprocessing of ``prepare`` (:func:`pipeline.data.prepare.volume_transform`:
orientation to RAS, HU window, liver ROI), the 2D detector runs on every liver slice of the ROI grid, and the maps
are put back on the input's own voxel grid by undoing the ROI crop (bilinear resampling to the native crop size,
then pasting at the crop box) and the reorientation. Outputs, all on the input grid with the input's affine::

    OUT/<case>_anomaly.nii.gz   float32 heatmap in [0, 1], 0 outside the liver
    OUT/<case>_lesions.nii.gz   uint8 {0, 1}: heatmap >= threshold, 3D components smaller than min_lesion_mm3 removed
    OUT/<case>_report.json      volume and slice scores, lesion candidates (voxel and world coordinates), settings
    OUT/<case>_overlay.png      optional: the three highest-scoring slices with the heatmap over the CT

The decision threshold and the preprocessing settings come from ``<bundle>/models/inference.json``, written at the
end of training by :class:`ThresholdSelector` (the threshold that maximises Dice on the validation split).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import IgniteInfo, min_version, optional_import
from scipy import ndimage

from networks.detector import FrequencyAwareDetector
from networks.ensemble import FLIP_CHOICES, AveragedAnomalyMap
from networks.scoring import DEFAULT_SF, image_scores
from pipeline.common.arguments import (
    add_deprecated_alias,
    flip_list,
    int_list,
    non_negative_float,
    parse_shard,
    positive_float,
    positive_int,
    unit_float,
)
from pipeline.common.bundle import BUNDLE_DIR, BUNDLE_ENV, default_bundle
from pipeline.common.io import (
    atomic_write,
    atomic_write_json,
    case_id_from_name,
    check_case_id,
    ensure_output_dir,
    inside_folder,
    load_case,
    read_case_ids_unique,
    save_nifti,
)
from pipeline.common.parallel import map_cases
from pipeline.data.datasets import CaseRecord
from pipeline.data.prepare import PrepareSettings, is_finite_number, prepare_settings_from_json, volume_transform
from pipeline.data.shards import select_shard
from pipeline.evaluate.localisation import best_dice
from transforms.errors import InputDataError
from transforms.roi import LiverMasks

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = [
    "INFERENCE_FORMAT",
    "SUMMARY_NAME",
    "read_inference_settings",
    "prepare_settings_from_json",
    "load_detector",
    "choose_threshold",
    "write_inference_settings",
    "ThresholdSelector",
    "default_case_id",
    "output_paths",
    "roi_to_source",
    "infer_volume",
    "infer_cases",
    "main",
]

INFERENCE_FORMAT = "hepafair-inference/1"
REPORT_FORMAT = "hepafair-report/1"
SUMMARY_NAME = "inference_summary.json"
OVERLAY_SLICES = 3


# ------------------------------------------------------------------------------------------------- bundle settings


def _bundle_files(bundle_dir_or_ckpt: str | os.PathLike) -> tuple[Path, Path]:
    """``(model.pt, inference.json)`` of a bundle root, its ``models`` folder, or a checkpoint file."""
    path = Path(bundle_dir_or_ckpt)
    if path.is_file():
        return path, path.parent / "inference.json"
    for models in (path / "models", path):
        if (models / "model.pt").is_file():
            return models / "model.pt", models / "inference.json"
    raise InputDataError(
        path,
        "no trained weights: neither models/model.pt nor model.pt is here.",
        "pass --bundle the bundle root used for training (it holds models/model.pt), or a checkpoint file.",
    )


def read_inference_settings(bundle_dir_or_ckpt: str | os.PathLike) -> dict:
    """The ``inference.json`` next to a bundle's weights as a dict, or ``{}`` when the bundle has none.

    Keys (all optional): ``threshold`` (float or None), ``width_preset`` (network widths; bundles trained before
    the rename wrote it as ``preset``, read as the same), ``prepare_settings``
    (:meth:`PrepareSettings.to_json`), ``network`` (constructor overrides), ``sf`` (the slice score's mean-filter
    size; absent in bundles trained before it was recorded: :data:`~networks.scoring.DEFAULT_SF`), ``metrics``.
    """
    _, settings_path = _bundle_files(bundle_dir_or_ckpt)
    if not settings_path.is_file():
        return {}
    try:
        settings = json.loads(settings_path.read_bytes())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputDataError(settings_path, f"cannot read the inference settings ({exc}).",
                             "re-run training, or delete the file and pass --threshold.") from exc
    if not isinstance(settings, dict):
        raise InputDataError(settings_path, "inference settings must be a JSON object.")
    _check_inference_settings(settings, settings_path)
    return settings


def _check_inference_settings(settings: Mapping[str, Any], path: Path) -> None:
    """Validate ``inference.json`` on load (one clear error naming the file), so that a bad value never becomes a
    traceback deep inside inference or a silent run that finds no lesion."""
    problems = []
    threshold = settings.get("threshold")
    if threshold is not None and not (is_finite_number(threshold) and 0.0 <= threshold <= 1.0):
        problems.append(f"threshold must be null or a number in [0, 1], got {threshold!r}")
    width_preset = recorded_width_preset(settings)
    if width_preset is not None and width_preset not in FrequencyAwareDetector.PRESETS:
        problems.append(f"width_preset must be one of {sorted(FrequencyAwareDetector.PRESETS)}, got {width_preset!r}")
    network = settings.get("network", {})
    allowed = set(inspect.signature(FrequencyAwareDetector.__init__).parameters) - {"self", "output"}
    if not isinstance(network, dict):
        problems.append(f"network must be an object of FrequencyAwareDetector arguments, got {network!r}")
    elif set(network) - allowed:
        problems.append(f"network has unknown keys {sorted(set(network) - allowed)} (known: {sorted(allowed)})")
    sf = settings.get("sf", DEFAULT_SF)
    if not (isinstance(sf, int) and not isinstance(sf, bool) and sf >= 1 and sf % 2 == 1):
        problems.append(f"sf must be a positive odd integer, got {sf!r}")
    prepare = settings.get("prepare_settings")
    if prepare is not None:
        try:
            prepare_settings_from_json(prepare)
        except (TypeError, ValueError) as exc:
            problems.append(f"prepare_settings: {exc}")
    if problems:
        raise InputDataError(path, "invalid inference settings: " + "; ".join(problems) + ".",
                             "re-run training to rewrite it, or correct the values.")


def recorded_width_preset(settings: Mapping[str, Any]) -> Any:
    """The network width preset an ``inference.json`` records (``width_preset``, formerly ``preset``), or None."""
    return settings.get("width_preset", settings.get("preset"))


def load_detector(
    bundle_dir_or_ckpt: str | os.PathLike,
    width_preset: str | None = None,
    device: str | torch.device | None = None,
    **network_overrides: Any,
) -> FrequencyAwareDetector:
    """The trained detector in inference form: ``output="anomaly_map"``, ``eval()``, on ``device``.

    Weights come from ``<bundle>/models/model.pt`` (or the checkpoint file given), a state dict saved as it is or
    wrapped as ``{"model": state_dict}``; the skip-decay weight alpha is a buffer inside it. The architecture comes
    from ``inference.json`` beside the weights when present (``width_preset`` and ``network`` overrides, as in
    training); ``width_preset`` and ``network_overrides`` given here win over it; without either, ``"default"``.

    Raises:
        InputDataError: no weights, an unreadable file, or weights that do not fit the architecture.
    """
    ckpt, _ = _bundle_files(bundle_dir_or_ckpt)
    settings = read_inference_settings(bundle_dir_or_ckpt)
    kwargs = {**settings.get("network", {}), **network_overrides, "output": "anomaly_map"}
    name = width_preset or recorded_width_preset(settings) or "default"
    detector = FrequencyAwareDetector.from_preset(name, **kwargs)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, runtime) for a damaged checkpoint
        raise InputDataError(ckpt, f"cannot read the checkpoint ({type(exc).__name__}: {exc}).",
                             "point --bundle at a checkpoint written by this project's training.") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        detector.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise InputDataError(ckpt, f"the weights do not fit the {name!r} detector with {network_overrides or {}} "
                                   f"({str(exc).splitlines()[0]}).",
                             "use the width preset and network settings of training (models/inference.json).") from exc
    resolved = torch.device(device) if device is not None else torch.device("cpu")
    return detector.to(resolved).eval()


# ------------------------------------------------------------------------------------------------ threshold choice


def _best_dice_in_liver(maps: Any, lesions: Any, livers: Any, n_thresholds: int) -> tuple[float, float]:
    """``(dice, threshold)`` of :func:`pipeline.evaluate.localisation.best_dice` over the liver pixels only."""
    m, g, liver = (np.asarray(x.detach().cpu() if torch.is_tensor(x) else x) for x in (maps, lesions, livers))
    if not m.shape == g.shape == liver.shape:
        raise ValueError(f"maps {m.shape}, lesions {g.shape} and livers {liver.shape} must have the same shape.")
    inside = liver > 0
    return best_dice(m[inside][None], (g[inside] > 0)[None], n_thresholds=n_thresholds)


def choose_threshold(maps: Any, lesions: Any, livers: Any, n_thresholds: int = 200) -> float:
    """The map threshold that maximises dataset-level Dice inside the liver (``localisation.best_dice``).

    Only liver pixels are pooled, because inference zeroes the heatmap outside the liver.

    Args:
        maps: anomaly maps of any shape, e.g. ``(N, 1, H, W)`` in [0, 1] (numpy or torch).
        lesions: same shape, binary lesion ground truth.
        livers: same shape, binary liver masks.
        n_thresholds: candidate thresholds evenly spaced inside the maps' range.

    Returns:
        the threshold (a float in the maps' range).

    Raises:
        ValueError: shapes differ, or no lesion pixel lies inside the livers (Dice is undefined).
    """
    _, threshold = _best_dice_in_liver(maps, lesions, livers, n_thresholds)
    if np.isnan(threshold):
        raise ValueError("no lesion pixel inside the liver masks: the Dice-optimal threshold is undefined.")
    return float(threshold)


def _settings_document(
    threshold: float | None,
    prepare_settings: PrepareSettings | Mapping[str, Any] | None,
    width_preset: str,
    network_overrides: Mapping[str, Any] | None,
    metrics: Mapping[str, Any] | None,
    sf: int = DEFAULT_SF,
) -> dict:
    if isinstance(prepare_settings, PrepareSettings):
        prepare_json = prepare_settings.to_json()
    else:
        prepare_json = prepare_settings_from_json(prepare_settings).to_json()
    return {
        "format": INFERENCE_FORMAT,
        "threshold": None if threshold is None else float(threshold),
        "width_preset": width_preset,
        "prepare_settings": prepare_json,
        "network": dict(network_overrides or {}),
        "sf": int(sf),
        "metrics": dict(metrics or {}),
    }


def write_inference_settings(
    bundle_dir: str | os.PathLike,
    threshold: float | None,
    prepare_settings: PrepareSettings | Mapping[str, Any] | None,
    width_preset: str = "default",
    network_overrides: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    sf: int = DEFAULT_SF,
) -> Path:
    """Write ``<bundle_dir>/models/inference.json`` atomically (see :func:`read_inference_settings`); return its path.

    ``threshold`` None records that none could be chosen (inference then needs ``--threshold``).
    """
    models = ensure_output_dir(Path(bundle_dir) / "models")
    document = _settings_document(threshold, prepare_settings, width_preset, network_overrides, metrics, sf)
    return atomic_write_json(models / "inference.json", document)


class ThresholdSelector:
    """ignite handler: choose the decision threshold on an evaluator's slices and write ``inference.json``.

    Attach to a ``SupervisedEvaluator`` whose ``iteration_update`` is
    :class:`pipeline.evaluate.engine.DetectorEvalStep` (output dict with ``map``, ``liver``, ``lesion``, each
    (B, 1, H, W)). Only liver pixels are kept between iterations (float32 map values and lesion flags), so memory
    grows with the liver area, not the slice count x H x W. At ``COMPLETED`` it writes ``output_path`` with the
    Dice-optimal threshold (None, with a note in ``metrics``, when the slices hold no lesion pixel), the preprocessing and the network settings. Single-process:
    under DDP attach it on rank 0 of a non-distributed evaluator.

    Args:
        output_path: the ``inference.json`` to write (the bundle's ``models/inference.json``).
        prepare_settings: the preprocessing of the training data (``manifest["settings"]``).
        width_preset: network width preset of training.
        network_overrides: the constructor overrides of training (e.g. ``use_highpass``, ``highpass_cutoff``).
        n_thresholds: candidate thresholds (see :func:`choose_threshold`).
        sf: the image score's mean-filter size of training, recorded for inference's slice scores.
    """

    def __init__(
        self,
        output_path: str | os.PathLike,
        prepare_settings: PrepareSettings | Mapping[str, Any] | None = None,
        width_preset: str = "default",
        network_overrides: Mapping[str, Any] | None = None,
        n_thresholds: int = 200,
        sf: int = DEFAULT_SF,
    ) -> None:
        self.output_path = Path(output_path)
        self.prepare_settings = prepare_settings
        self.width_preset = width_preset
        self.network_overrides = dict(network_overrides or {})
        self.n_thresholds = n_thresholds
        self.sf = int(sf)
        self._values: list[torch.Tensor] = []
        self._lesion: list[torch.Tensor] = []
        self._n_slices = 0

    def attach(self, engine: Any) -> None:
        """Register with ``engine``: reset at ``EPOCH_STARTED``, collect per iteration, write at ``COMPLETED``."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Any) -> None:
        self._values, self._lesion, self._n_slices = [], [], 0

    def _collect(self, engine: Any) -> None:
        out = engine.state.output
        inside = torch.as_tensor(out["liver"]).detach().cpu() > 0
        self._values.append(torch.as_tensor(out["map"]).detach().cpu()[inside].float())
        self._lesion.append((torch.as_tensor(out["lesion"]).detach().cpu() > 0)[inside])
        self._n_slices += int(inside.shape[0])

    def _write(self, engine: Any) -> None:
        values = torch.cat(self._values).numpy() if self._values else np.zeros(0, np.float32)
        lesion = torch.cat(self._lesion).numpy() if self._lesion else np.zeros(0, bool)
        metrics: dict[str, Any] = {
            "n_slices": self._n_slices,
            "liver_pixels": int(values.size),
            "lesion_pixels": int(lesion.sum()),
        }
        threshold = None
        if lesion.any():
            dice, threshold = _best_dice_in_liver(values, lesion, np.ones(values.shape, bool), self.n_thresholds)
            metrics["val_dice"] = dice
        else:
            metrics["note"] = "no lesion pixel in the evaluated slices: no threshold chosen; pass --threshold."
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        document = _settings_document(threshold, self.prepare_settings, self.width_preset, self.network_overrides,
                                      metrics, self.sf)
        atomic_write_json(self.output_path, document)


# --------------------------------------------------------------------------------------------------------- geometry


def _orientation_to(native_affine: np.ndarray, native_shape: Sequence[int], axcodes: str,
                    oriented_affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform native array -> ``axcodes`` array, checked against the affine that
    ``Orientationd`` produced (so the inverse used here is the inverse of what preprocessing did)."""
    native_ornt = nib.orientations.io_orientation(native_affine)
    to_oriented = nib.orientations.ornt_transform(native_ornt, nib.orientations.axcodes2ornt(axcodes))
    expected = native_affine @ nib.orientations.inv_ornt_aff(to_oriented, tuple(native_shape))
    if not np.allclose(expected, oriented_affine, atol=1e-4):
        raise RuntimeError(
            f"the reoriented affine {np.round(oriented_affine, 4).tolist()} is not the nibabel reorientation "
            f"{np.round(expected, 4).tolist()} of the input affine; cannot invert the orientation."
        )
    return to_oriented


def roi_to_source(roi_map: torch.Tensor, roi: Mapping[str, Any]) -> torch.Tensor:
    """Put a map on the ROI grid back on the (reoriented) source grid: the inverse of :class:`transforms.roi.LiverROI`.

    Each slice is resampled to the native crop size ``(w, h)`` of ``roi["box"]`` (bilinear, ``align_corners=False``,
    the sampling positions of the ROI affine) and pasted at the box in a zero volume; parts of the box outside the
    image are dropped.

    In: ``roi_map`` (S, S, Z) float; ``roi``: the dict :class:`transforms.roi.LiverROId` writes (``box``,
    ``source_shape``). Out: (X, Y, Z) float32 tensor on the source grid (``roi["source_shape"]``), same value range,
    in Fortran order (X fastest) like the NIfTI it came from, so that writing it needs no transposing copy.
    """
    x0, x1, y0, y1 = (int(v) for v in roi["box"])
    sx, sy, sz = (int(v) for v in roi["source_shape"])
    if roi_map.ndim != 3 or roi_map.shape[-1] != sz:
        raise ValueError(f"roi_map must be (S, S, {sz}), got {tuple(roi_map.shape)}.")
    w, h = x1 - x0, y1 - y0
    stack = roi_map.float().permute(2, 0, 1)[:, None]  # (Z, 1, S, S): slices as a batch
    if stack.shape[-2:] != (w, h):
        stack = F.interpolate(stack, size=(w, h), mode="bilinear", align_corners=False)
    out = torch.zeros((sz, sy, sx), dtype=torch.float32, device=roi_map.device)  # (X, Y, Z) in Fortran order
    cx0, cx1, cy0, cy1 = max(x0, 0), min(x1, sx), max(y0, 0), min(y1, sy)
    if cx0 < cx1 and cy0 < cy1:
        out[:, cy0:cy1, cx0:cx1] = stack[:, 0, cx0 - x0 : cx1 - x0, cy0 - y0 : cy1 - y0].transpose(1, 2)
    return out.permute(2, 1, 0)


# ----------------------------------------------------------------------------------------------------------- outputs


def default_case_id(image_path: str | os.PathLike) -> str:
    """The image file name without ``.nii``/``.nii.gz`` and without a trailing ``_ct``, as a safe case id (other
    characters than letters, digits and ``._+-`` become ``_``)."""
    stem = re.sub(r"\.nii(\.gz)?$", "", Path(image_path).name, flags=re.IGNORECASE)
    return case_id_from_name(re.sub(r"_ct$", "", stem, flags=re.IGNORECASE) or stem)


def output_paths(out_dir: str | os.PathLike, case_id: str, overlay: bool = False) -> dict[str, Path]:
    """Paths of the files :func:`infer_volume` writes: ``anomaly``, ``lesions``, ``report`` [and ``overlay``].

    Raises:
        InputDataError: ``case_id`` is not one safe name (:func:`~pipeline.common.io.check_case_id`).
    """
    out = Path(out_dir)
    check_case_id(case_id, out)
    paths = {
        "anomaly": out / f"{case_id}_anomaly.nii.gz",
        "lesions": out / f"{case_id}_lesions.nii.gz",
        "report": out / f"{case_id}_report.json",
    }
    if overlay:
        paths["overlay"] = out / f"{case_id}_overlay.png"
    return paths


def _check_outputs(paths: Mapping[str, Path], inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse outputs outside the output folder or that are an input (always), or that already exist (unless
    ``overwrite``), before any work."""
    input_files = {p.resolve() for p in inputs}
    for path in paths.values():
        inside_folder(path.parent, path)
        if path.resolve() in input_files:
            raise InputDataError(path, "an output of this case would replace one of its input files.",
                                 "choose another --out folder or give the case another id.")
        if path.exists() and not overwrite:
            raise InputDataError(path, "output file already exists.", "--overwrite to replace it, or another --out.")


def _check_batch_outputs(records: Sequence[CaseRecord], out: Path, overlay: bool) -> None:
    """Refuse a batch, before anything is written, whose planned outputs collide with each other or with any case's
    input (with ``--overwrite``, case x's heatmap must never replace case y's label map)."""
    inputs = {Path(p).resolve(): r.case_id for r in records for p in (r.image, r.label)}
    planned: dict[Path, str] = {}
    for record in records:
        for path in output_paths(out, record.case_id, overlay).values():
            key = path.resolve()
            if key in inputs:
                raise InputDataError(path, f"an output of case {record.case_id!r} would replace an input file of case "
                                     f"{inputs[key]!r}.", "write the outputs to a folder that holds no inputs.")
            if key in planned:
                raise InputDataError(path, f"cases {planned[key]!r} and {record.case_id!r} would write the same "
                                     "output file.", "give the cases distinct ids.")
            planned[key] = record.case_id


def _missing_label_error(image_path: str | os.PathLike) -> InputDataError:
    return InputDataError(
        image_path,
        "no liver label given: inference looks for lesions inside the liver, so it needs a liver mask on the CT's "
        "grid (a lesion label is not needed).",
        "pass --label FILE with the mask's values (--liver-values 1 [--lesion-values 2], or --label-preset NAME, "
        "e.g. totalsegmentator for a TotalSegmentator v2 map where the liver is 5).",
    )


def _lesion_candidates(
    heatmap: np.ndarray, binary: np.ndarray, affine: np.ndarray, slice_axis: int, min_lesion_mm3: float
) -> tuple[np.ndarray, list[dict]]:
    """Drop 3D components (face connectivity) under ``min_lesion_mm3``; describe the rest, highest score first."""
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    components, n = ndimage.label(binary)
    keep = np.zeros(n + 1, dtype=bool)
    candidates = []
    for index, region in enumerate(ndimage.find_objects(components), start=1):
        if region is None:
            continue
        inside = components[region] == index
        n_voxels = int(inside.sum())
        if n_voxels * voxel_mm3 < min_lesion_mm3:
            continue
        keep[index] = True
        coords = np.argwhere(inside) + np.array([s.start for s in region])
        centroid = coords.mean(axis=0)
        values = heatmap[region][inside]
        candidates.append(
            {
                "voxels": n_voxels,
                "volume_ml": n_voxels * voxel_mm3 / 1000.0,
                "centroid_voxel": [float(c) for c in centroid],
                "centroid_mm": [float(c) for c in nib.affines.apply_affine(affine, centroid)],
                "slice_range": [int(coords[:, slice_axis].min()), int(coords[:, slice_axis].max())],
                "max_score": float(values.max()),
                "mean_score": float(values.mean()),
            }
        )
    candidates.sort(key=lambda c: -c["max_score"])
    for rank, candidate in enumerate(candidates, start=1):
        candidate["id"] = rank
    return keep[components], candidates


def _write_overlay(
    path: Path, ct_ras: np.ndarray, heat_ras: np.ndarray, mask_ras: np.ndarray, spacing: Sequence[float],
    slices: Sequence[tuple[int, float]], hu_window: Sequence[float], threshold: float,
) -> None:
    """PNG of ``slices`` ((RAS slice index, score) pairs): windowed CT in gray, heatmap in colour, lesion contours.

    Slices are shown in radiological convention (patient right on the image's left, anterior up).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pipeline.common.display import (
        ras_to_display as view,  # RAS (x, y) -> rows from anterior, columns from patient right
    )

    fig = Figure(figsize=(4 * max(1, len(slices)), 4.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (k, score) in enumerate(slices):
        ax = fig.add_subplot(1, max(1, len(slices)), i + 1)
        aspect = spacing[1] / spacing[0]
        ax.imshow(view(ct_ras[:, :, k]), cmap="gray", vmin=hu_window[0], vmax=hu_window[1], aspect=aspect)
        heat = np.ma.masked_less_equal(view(heat_ras[:, :, k]), 0.0)
        ax.imshow(heat, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45, aspect=aspect)
        if mask_ras[:, :, k].any():
            ax.contour(view(mask_ras[:, :, k]).astype(float), levels=[0.5], colors="white", linewidths=0.8)
        ax.set_title(f"slice {k} (RAS)  score {score:.3f}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"anomaly heatmap, lesion contour at threshold {threshold:.3g}", fontsize=10)
    atomic_write(path, lambda temp: fig.savefig(temp, format="png"))


# --------------------------------------------------------------------------------------------------------- inference


def _module_device(module: Any) -> torch.device:
    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
    return params[0].device if params else torch.device("cpu")


def infer_volume(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike | None,
    detector: Any,
    *,
    liver_values: Sequence[int],
    lesion_values: Sequence[int] = (),
    settings: PrepareSettings,
    threshold: float,
    min_lesion_mm3: float = 100.0,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    out_dir: str | os.PathLike,
    case_id: str | None = None,
    overwrite: bool = False,
    overlay: bool = False,
    series_uid: str | None = None,
    sf: int = DEFAULT_SF,
) -> dict:
    """Detect liver lesions in one CT volume; write heatmap, lesion mask, report (and overlay) to ``out_dir``.

    Args:
        image_path: CT NIfTI in Hounsfield units, any axis-aligned orientation, or a DICOM CT series folder (outputs
            are NIfTI on the grid reconstructed from it).
        label_path: label NIfTI on the same grid holding the liver (``liver_values``); lesion values are optional
            and count as liver. None raises an :class:`InputDataError` that says how to provide one.
        detector: a module with ``anomaly_map(image (B, 1, S, S) in [0, 1]) -> (B, 1, S, S) in [0, 1]``, e.g. from
            :func:`load_detector`.
        liver_values: label values meaning liver.
        lesion_values: label values meaning lesion (part of the liver).
        settings: the preprocessing of training (``inference.json``'s ``prepare_settings``).
        threshold: heatmap value at and above which a voxel is a lesion candidate.
        min_lesion_mm3: candidates (3D connected components) smaller than this are dropped from the mask.
        batch_size: slices per detector call.
        device: where the detector runs; None: where its parameters are (CPU for parameter-free modules).
        out_dir: output folder (created).
        case_id: output name prefix; default :func:`default_case_id` of the image.
        overwrite: replace existing outputs; the inputs are never replaced.
        overlay: also write the PNG overlay of the three highest-scoring slices.
        series_uid: which series of a DICOM folder to read (needed when it holds several).
        sf: mean-filter size of the slice scores (the bundle's ``inference.json`` ``sf``).

    Returns:
        the report written to ``<case>_report.json``: ``volume_score``, ``slices`` (per native slice index along
        ``slice_axis``), ``lesions`` (candidates with voxel/world centroids), ``outputs``, settings and timings.

    Raises:
        InputDataError: missing label, bad input files, or outputs that exist without ``overwrite``.
    """
    timings: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now

    if label_path is None:
        raise _missing_label_error(image_path)
    image_path, label_path = Path(image_path), Path(label_path)
    case_id = case_id or default_case_id(image_path)
    out = ensure_output_dir(out_dir)
    paths = output_paths(out, case_id, overlay)
    _check_outputs(paths, (image_path, label_path), overwrite)

    data = load_case(image_path, label_path, liver_values, lesion_values, series_uid)
    native_affine = np.asarray(data["image"].meta["original_affine"], dtype=np.float64)
    native_ct = data["image"].as_tensor()[0].numpy()
    native_shape = native_ct.shape
    native_liver = LiverMasks(liver_values, lesion_values).boolean(data["label"].as_tensor()[0])[0].numpy()
    lap("load")

    vol = volume_transform(settings, liver_values, lesion_values)(data)
    roi = vol["roi"]
    to_ras = _orientation_to(native_affine, native_shape, settings.orientation, np.asarray(roi["source_affine"]))
    lap("preprocess")

    device = torch.device(device) if device is not None else _module_device(detector)
    if isinstance(detector, torch.nn.Module):
        detector = detector.to(device).eval()
    roi_image = vol["image"].as_tensor()[0]  # (S, S, Z)
    roi_liver = torch.as_tensor(vol["liver"])[0]
    liver_slices = np.flatnonzero(np.asarray(vol["liver_voxels"]) > 0)
    roi_map = torch.zeros_like(roi_image)
    scores = torch.zeros(roi_image.shape[-1])
    with torch.inference_mode():
        for first in range(0, len(liver_slices), batch_size):
            ks = torch.as_tensor(liver_slices[first : first + batch_size])
            batch = roi_image[:, :, ks].permute(2, 0, 1)[:, None].to(device)
            liver = roi_liver[:, :, ks].permute(2, 0, 1)[:, None]
            amap = detector.anomaly_map(batch).float().cpu() * liver
            roi_map[:, :, ks] = amap[:, 0].permute(1, 2, 0)
            scores[ks] = image_scores(amap, sf)
    lap("detector")

    heat_ras = roi_to_source(roi_map, roi).numpy()
    from_ras = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(settings.orientation),
                                               nib.orientations.io_orientation(native_affine))
    heatmap = np.asfortranarray(nib.orientations.apply_orientation(heat_ras, from_ras), dtype=np.float32)
    heatmap *= native_liver
    # nibabel's transform sends native axis i to oriented axis to_ras[i, 0], reversed when to_ras[i, 1] is -1
    slice_axis = int(np.flatnonzero(to_ras[:, 0] == 2)[0])
    flipped = bool(to_ras[slice_axis, 1] < 0)
    lesion_mask, candidates = _lesion_candidates(heatmap, (heatmap >= threshold) & native_liver, native_affine,
                                                 slice_axis, min_lesion_mm3)
    lap("invert")

    n_native = native_shape[slice_axis]
    slices = [
        {
            "slice_index": int(n_native - 1 - k if flipped else k),
            "ras_slice_index": int(k),
            "score": float(scores[k]),
            "liver_voxels": int(vol["liver_voxels"][k]),
        }
        for k in liver_slices
    ]
    save_nifti(paths["anomaly"], heatmap, native_affine, dtype=np.float32, overwrite=overwrite)
    save_nifti(paths["lesions"], lesion_mask.astype(np.uint8), native_affine, dtype=np.uint8, overwrite=overwrite)
    if overlay:
        top = sorted(((int(k), float(scores[k])) for k in liver_slices), key=lambda t: -t[1])[:OVERLAY_SLICES]
        ct_ras, shown_ras, mask_ras = (
            nib.orientations.apply_orientation(a, to_ras) for a in (native_ct, heatmap, lesion_mask)
        )
        spacing = np.linalg.norm(np.asarray(roi["source_affine"])[:3, :2], axis=0)
        _write_overlay(paths["overlay"], ct_ras, shown_ras, mask_ras, spacing, top, settings.hu_window, threshold)
    lap("write")
    timings["total"] = round(time.perf_counter() - start, 4)

    report = {
        "format": REPORT_FORMAT,
        "case_id": case_id,
        "image": str(image_path),
        "series_uid": data["image"].meta.get("series_uid"),
        "label": str(label_path),
        "outputs": {k: str(p) for k, p in paths.items()},
        "shape": [int(n) for n in native_shape],
        "affine": native_affine.tolist(),
        "spacing_mm": [float(s) for s in np.linalg.norm(native_affine[:3, :3], axis=0)],
        "slice_axis": slice_axis,
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
    atomic_write_json(paths["report"], report)
    return report


def infer_cases(
    records: Sequence[CaseRecord],
    detector: Any,
    *,
    settings: PrepareSettings,
    threshold: float,
    out_dir: str | os.PathLike,
    min_lesion_mm3: float = 100.0,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    overlay: bool = False,
    strict: bool = False,
    progress: bool = True,
    workers: int = 1,
    summary_name: str = SUMMARY_NAME,
    sf: int = DEFAULT_SF,
) -> dict:
    """Run :func:`infer_volume` on every record; write and return ``out_dir/<summary_name>``.

    A case that fails with bad input (:class:`InputDataError`, ``OSError``) is recorded and the others go on, unless
    ``strict``, which re-raises the first error. Callers decide the exit status from ``summary["n_failed"]``.

    Args:
        detector: the detector; with ``workers > 1`` a picklable function returning one instead (e.g.
            ``functools.partial(build_detector, ...)``), called once in each worker process.
        workers: cases inferred at once, in worker processes (:func:`pipeline.common.parallel.map_cases`); outputs are
            identical to ``workers=1``.
        summary_name: the summary's file name (one per shard when shards share ``out_dir``).
    """
    out = ensure_output_dir(out_dir)
    read_case_ids_unique([r.case_id for r in records], [r.image for r in records])
    _check_batch_outputs(records, out, overlay)
    options = dict(settings=settings, threshold=threshold, min_lesion_mm3=min_lesion_mm3, batch_size=batch_size,
                   device=device, out_dir=out, overwrite=overwrite, overlay=overlay, sf=sf)
    if workers > 1:
        func, initializer, initargs = partial(_infer_record, **options), _set_worker_detector, (detector,)
    else:
        func, initializer, initargs = partial(_infer_record, detector=detector, **options), None, ()

    def done(k: int, report: dict | None, error: BaseException | None) -> None:
        if progress:
            detail = (f"score {report['volume_score']:.3f}, {report['n_lesions']} lesion(s)" if error is None
                      else f"FAILED: {error}")
            print(f"[{k + 1}/{len(records)}] {records[k].case_id}: {detail}", file=sys.stderr, flush=True)

    results = map_cases(func, records, workers, strict=strict, on_done=done, initializer=initializer,
                        initargs=initargs)
    rows = []
    for record, (report, error) in zip(records, results):
        row: dict[str, Any] = {"case_id": record.case_id, "image": str(record.image), "label": str(record.label)}
        if error is not None:
            row.update(status="failed", error=str(error))
        else:
            row.update(status="ok", volume_score=report["volume_score"], n_lesions=report["n_lesions"],
                       report=report["outputs"]["report"], seconds=report["timings_s"]["total"])
        rows.append(row)
    failed = [r["case_id"] for r in rows if r["status"] == "failed"]
    summary = {
        "format": "hepafair-inference-summary/1",
        "n_cases": len(rows),
        "n_failed": len(failed),
        "failed": failed,
        "threshold": float(threshold),
        "settings": settings.to_json(),
        "cases": rows,
    }
    atomic_write_json(out / summary_name, summary)
    return summary


_WORKER_DETECTOR: Any = None  # the detector of this worker process (map_cases initializer)


def _set_worker_detector(make_detector: Any) -> None:
    global _WORKER_DETECTOR
    _WORKER_DETECTOR = make_detector()


def _infer_record(record: CaseRecord, detector: Any = None, **options: Any) -> dict:
    return infer_volume(record.image, record.label, detector if detector is not None else _WORKER_DETECTOR,
                        liver_values=record.liver_values, lesion_values=record.lesion_values,
                        case_id=record.case_id, series_uid=record.series_uid, **options)


def build_detector(bundles: Sequence[str | os.PathLike], width_preset: str | None = None,
                   device: str | torch.device = "cpu", flips: Sequence[str] = ()) -> torch.nn.Module:
    """The detector of one bundle, or the mean map of several (a seed ensemble) and/or test-time flips."""
    detectors = [load_detector(bundle, width_preset, device) for bundle in bundles]
    return AveragedAnomalyMap(detectors, flips) if len(detectors) > 1 or flips else detectors[0]


# ---------------------------------------------------------------------------------------------------------- command


def _parser() -> argparse.ArgumentParser:
    from pipeline.data.datasets import LAYOUTS, PRESETS

    p = argparse.ArgumentParser(
        prog="hepafair infer",
        description="CT volume(s) + liver mask(s) -> lesion heatmap, lesion mask and JSON report per case, on the "
        "input's own grid. Several cases: repeat --image/--label, or give --data; a bad case is recorded in "
        f"OUT/{SUMMARY_NAME} and the others go on (non-zero exit at the end).",
    )
    inputs = p.add_argument_group("inputs")
    inputs.add_argument("-i", "--image", action="append", default=[], metavar="CT",
                        help="CT NIfTI in HU, or a folder holding a DICOM CT series (repeatable)")
    inputs.add_argument("--series-uid", action="append", default=[], metavar="UID",
                        help="SeriesInstanceUID to read from a DICOM folder holding several series; one per --image "
                        "in the same order ('' for a NIfTI or a single-series folder)")
    inputs.add_argument("-l", "--label", action="append", default=[], metavar="LABEL",
                        help="liver mask / label map (on the CT's grid, or on a coarser one covering it) or a "
                        "TotalSegmentator output folder; one per --image, in the same order")
    inputs.add_argument("--data", action="append", default=[], metavar="PATH",
                        help="dataset folder or datalist JSON (repeatable), discovered as by `prepare`")
    inputs.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="layout of --data")
    label_preset = inputs.add_argument(
        "--label-preset", choices=sorted(PRESETS), default=None,
        help="which label values mean liver / lesion (default: lits, liver 1, lesion 2)")
    add_deprecated_alias(inputs, "--preset", label_preset)
    inputs.add_argument("--liver-values", type=int_list, default=None, metavar="V[,V]",
                        help="label values meaning liver (overrides the label preset)")
    inputs.add_argument("--lesion-values", type=int_list, default=None, metavar="V[,V]",
                        help="label values meaning lesion, counted as liver (overrides the label preset)")
    model = p.add_argument_group("model")
    model.add_argument("-b", "--bundle", action="append", default=[], metavar="BUNDLE",
                       help="bundle root (holding models/model.pt and models/inference.json) or a checkpoint file; "
                       "repeat it for a seed ensemble (the mean of the models' maps; needs --threshold). Default: "
                       f"${BUNDLE_ENV}, else the bundle of this installation ({BUNDLE_DIR}) when it holds weights")
    model.add_argument("--tta-flips", type=flip_list, default=[], metavar="F[,F]",
                       help=f"test-time flips averaged with the slice as it is: {', '.join(FLIP_CHOICES)} "
                       "(needs --threshold). Measured on IRCADb p17 they lowered the AUROCs (bundle docs).")
    width_preset = model.add_argument(
        "--width-preset", default=None, choices=sorted(FrequencyAwareDetector.PRESETS),
        help="network width preset (default: the bundle's inference.json, else 'default')")
    add_deprecated_alias(model, "--network-preset", width_preset)
    model.add_argument("--threshold", type=unit_float, default=None,
                       help="lesion threshold on the heatmap (default: the bundle's validation-chosen threshold; "
                       "an ensemble or flips need it given: their mean map is smoother than the one it was chosen on)")
    model.add_argument("--size", type=positive_int, default=None,
                       help="slice size (default: the bundle's training setting)")
    model.add_argument("--field-mm", type=positive_float, default=None,
                       help="in-plane field around the liver in mm (default: the bundle's training setting)")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    model.add_argument("--batch-size", type=positive_int, default=16, help="slices per network call (default: 16)")
    out = p.add_argument_group("outputs")
    out.add_argument("-o", "--out", required=True, help="output folder")
    out.add_argument("--min-lesion-mm3", type=non_negative_float, default=100.0,
                     help="drop lesion candidates smaller than this (default: 100 mm^3)")
    out.add_argument("--overlay", action="store_true", help="also write <case>_overlay.png (top 3 slices)")
    out.add_argument("--overwrite", action="store_true", help="replace existing outputs (inputs are never replaced)")
    out.add_argument("--strict", action="store_true", help="stop at the first bad case instead of recording it")
    run = p.add_argument_group("parallel")
    run.add_argument("--workers", type=positive_int, default=1, metavar="N",
                     help="cases inferred at once, in N processes each holding the model (default: 1)")
    run.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                     help="infer only shard I of N of the cases (0-based, every N-th by case id); the summary is "
                     "then OUT/inference_summary.shard-I-of-N.json, so shards may share OUT")
    return p


def _records(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[CaseRecord]:
    """The cases named on the command line: --image/--label pairs, then everything --data discovers."""
    from pipeline.data.datasets import discover, resolve_preset

    if not args.image and not args.data:
        parser.error("give --image CT --label LIVER (repeatable) or --data PATH.")
    if args.image and not args.label:
        raise _missing_label_error(args.image[0])
    if len(args.label) != len(args.image):
        parser.error(f"{len(args.image)} --image but {len(args.label)} --label: give one label per image.")
    if args.series_uid and len(args.series_uid) != len(args.image):
        parser.error(f"{len(args.image)} --image but {len(args.series_uid)} --series-uid: give one per image, in the "
                     "same order ('' where none is needed).")
    values = resolve_preset(args.label_preset, args.liver_values, args.lesion_values)
    uids = [uid.strip() or None for uid in args.series_uid] or [None] * len(args.image)
    records = [
        CaseRecord(default_case_id(image), Path(image), Path(label), "cli", values.liver_values, values.lesion_values,
                   series_uid=uid)
        for image, label, uid in zip(args.image, args.label, uids)
    ]
    for root in args.data:
        records += discover(root, args.layout, args.label_preset, args.liver_values, args.lesion_values)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline infer``: exit 0 when every case succeeded, 1 when some failed, 2 on a usage error."""
    parser = _parser()
    args = parser.parse_args(argv)
    records = _records(args, parser)
    if not args.bundle:
        installed = default_bundle()
        if installed is None:
            parser.error(f"no --bundle given, ${BUNDLE_ENV} is not set and the bundle of this installation "
                         f"({BUNDLE_DIR}) holds no trained weights (models/model.pt): train one (README, "
                         "'Training') or pass --bundle PATH.")
        args.bundle = [str(installed)]
    averaged = len(args.bundle) > 1 or bool(args.tta_flips)
    if averaged and args.threshold is None:
        parser.error("a seed ensemble (several --bundle) or --tta-flips needs --threshold T: the bundles' thresholds "
                     "were chosen on one model's maps.")
    bundle_settings = read_inference_settings(args.bundle[0])
    threshold = args.threshold if args.threshold is not None else bundle_settings.get("threshold")
    if threshold is None:
        raise InputDataError(args.bundle[0], "the bundle holds no lesion threshold (models/inference.json is missing "
                                             "or training found no validation lesion to choose one).",
                             "pass --threshold T (a heatmap value in [0, 1]).")
    settings = prepare_settings_from_json(bundle_settings.get("prepare_settings"))
    for other in args.bundle[1:]:
        if prepare_settings_from_json(read_inference_settings(other).get("prepare_settings")) != settings:
            raise InputDataError(other, f"its slices were prepared with other settings than {args.bundle[0]}'s "
                                        "(models/inference.json, prepare_settings).",
                                 "ensemble only bundles trained on the same prepared data settings.")
    overrides = {k: v for k, v in (("size", args.size), ("field_mm", args.field_mm)) if v is not None}
    try:
        settings = dataclasses.replace(settings, **overrides)
    except ValueError as exc:
        parser.error(str(exc))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    make_detector = partial(build_detector, args.bundle, args.width_preset, device, args.tta_flips)
    detector = make_detector()  # here too with --workers: a bundle that does not load fails before any case
    divisor = max([int(getattr(m, "divisor", 1)) for m in detector.modules()] + [1])
    if settings.size % divisor:
        parser.error(f"slice size {settings.size} does not fit the network, which needs a multiple of {divisor} "
                     "(--size, or the bundle's prepare_settings).")
    summary_name = SUMMARY_NAME
    if args.shard is not None:
        records = select_shard(records, *args.shard, key=lambda r: r.case_id)
        summary_name = f"inference_summary.shard-{args.shard[0]}-of-{args.shard[1]}.json"
    summary = infer_cases(
        records, make_detector if args.workers > 1 else detector, settings=settings, threshold=float(threshold),
        out_dir=args.out, min_lesion_mm3=args.min_lesion_mm3, batch_size=args.batch_size, device=device,
        overwrite=args.overwrite, overlay=args.overlay, strict=args.strict, workers=args.workers,
        summary_name=summary_name, sf=int(bundle_settings.get("sf", DEFAULT_SF)),
    )
    line = f"infer: {summary['n_cases'] - summary['n_failed']} of {summary['n_cases']} cases done -> {args.out}"
    if summary["n_failed"]:
        print(f"{line}; {summary['n_failed']} failed: {', '.join(summary['failed'])} "
              f"(see {Path(args.out) / summary_name})", file=sys.stderr)
        return 1
    print(line)
    return 0

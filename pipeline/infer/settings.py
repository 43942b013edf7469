"""A bundle's trained detector and its ``models/inference.json``: find, read, check and write them, build the detector.

``inference.json`` records what inference must repeat from training: the decision threshold, the preprocessing
(:class:`~pipeline.data.settings.PrepareSettings`), the network's width preset and overrides, the slice score's
mean-filter size and the 2.5D slice context. :class:`pipeline.infer.threshold.ThresholdSelector` writes it at the
end of training.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from networks.detector import FrequencyAwareDetector
from networks.ensemble import AveragedAnomalyMap
from networks.scoring import DEFAULT_SF
from pipeline.common.files import atomic_write_json, ensure_output_dir
from pipeline.data.settings import PrepareSettings, is_finite_number, prepare_settings_from_json
from transforms.context import SliceContext
from transforms.errors import InputDataError

__all__ = [
    "INFERENCE_FORMAT",
    "read_inference_settings",
    "prepare_settings_from_json",
    "recorded_slice_context",
    "recorded_width_preset",
    "load_detector",
    "build_detector",
    "settings_document",
    "write_inference_settings",
]

INFERENCE_FORMAT = "hepafair-inference/1"


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
    size; absent in bundles trained before it was recorded: :data:`~networks.scoring.DEFAULT_SF`), ``metrics``,
    ``slice_context`` (the 2.5D input, :class:`~transforms.context.SliceContext` JSON; absent: plain 2D, read by
    :func:`recorded_slice_context`).
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
    try:
        context = recorded_slice_context(settings)
        channels = network.get("in_channels", 1) if isinstance(network, dict) else 1
        if channels != context.channels:
            problems.append(f"network in_channels {channels!r} does not match slice_context {context.to_json()} "
                            f"({context.channels} channels)")
    except (TypeError, ValueError) as exc:
        problems.append(f"slice_context: {exc}")
    prepare = settings.get("prepare_settings")
    if prepare is not None:
        try:
            prepare_settings_from_json(prepare)
        except (TypeError, ValueError) as exc:
            problems.append(f"prepare_settings: {exc}")
    if problems:
        raise InputDataError(path, "invalid inference settings: " + "; ".join(problems) + ".",
                             "re-run training to rewrite it, or correct the values.")


def recorded_slice_context(settings: Mapping[str, Any]) -> SliceContext:
    """The 2.5D input an ``inference.json`` records (``slice_context``); plain 2D when it records none."""
    return SliceContext.from_json(settings.get("slice_context"))


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


def build_detector(bundles: Sequence[str | os.PathLike], width_preset: str | None = None,
                   device: str | torch.device = "cpu", flips: Sequence[str] = ()) -> torch.nn.Module:
    """The detector of one bundle, or the mean map of several (a seed ensemble) and/or test-time flips."""
    detectors = [load_detector(bundle, width_preset, device) for bundle in bundles]
    return AveragedAnomalyMap(detectors, flips) if len(detectors) > 1 or flips else detectors[0]


def settings_document(
    threshold: float | None,
    prepare_settings: PrepareSettings | Mapping[str, Any] | None,
    width_preset: str,
    network_overrides: Mapping[str, Any] | None,
    metrics: Mapping[str, Any] | None,
    sf: int = DEFAULT_SF,
    slice_context: SliceContext | Mapping[str, Any] | None = None,
) -> dict:
    """The content of ``inference.json`` (see :func:`read_inference_settings`)."""
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
        "slice_context": SliceContext.from_json(slice_context).to_json(),
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
    slice_context: SliceContext | Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<bundle_dir>/models/inference.json`` atomically (see :func:`read_inference_settings`); return its path.

    ``threshold`` None records that none could be chosen (inference then needs ``--threshold``).
    """
    models = ensure_output_dir(Path(bundle_dir) / "models")
    document = settings_document(threshold, prepare_settings, width_preset, network_overrides, metrics, sf,
                                 slice_context)
    return atomic_write_json(models / "inference.json", document)

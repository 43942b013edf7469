"""The decision threshold on the heatmap: the value that maximises Dice inside the liver on the validation split.

:class:`ThresholdSelector` chooses it at the end of training and writes it, with the settings inference must repeat,
to the bundle's ``models/inference.json`` (:mod:`pipeline.infer.settings`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import

from networks.scoring import DEFAULT_SF
from pipeline.common.files import atomic_write_json
from pipeline.data.settings import PrepareSettings
from pipeline.evaluate.localisation import best_dice
from pipeline.infer.settings import settings_document

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["choose_threshold", "ThresholdSelector"]


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


class ThresholdSelector:
    """ignite handler: choose the decision threshold on an evaluator's slices and write ``inference.json``.

    Attach to a ``SupervisedEvaluator`` whose ``iteration_update`` is
    :class:`pipeline.evaluate.engine.DetectorEvalStep` (output dict with ``map``, ``liver``, ``lesion``, each
    (B, 1, H, W)). Only liver pixels are kept between iterations (float32 map values and lesion flags), so memory
    grows with the liver area, not the slice count x H x W. At ``COMPLETED`` it writes ``output_path`` with the
    Dice-optimal threshold (None, with a note in ``metrics``, when the slices hold no lesion pixel), the preprocessing
    and the network settings. Single-process: under DDP attach it on rank 0 of a non-distributed evaluator.

    Args:
        output_path: the ``inference.json`` to write (the bundle's ``models/inference.json``).
        prepare_settings: the preprocessing of the training data (``manifest["settings"]``).
        width_preset: network width preset of training.
        network_overrides: the constructor overrides of training (e.g. ``use_highpass``, ``highpass_cutoff``).
        n_thresholds: candidate thresholds (see :func:`choose_threshold`).
        sf: the image score's mean-filter size of training, recorded for inference's slice scores.
        slice_context: the 2.5D input of training (``{"slices", "mm"}``, :class:`transforms.context.SliceContext`);
            None: plain 2D.
    """

    def __init__(
        self,
        output_path: str | os.PathLike,
        prepare_settings: PrepareSettings | Mapping[str, Any] | None = None,
        width_preset: str = "default",
        network_overrides: Mapping[str, Any] | None = None,
        n_thresholds: int = 200,
        sf: int = DEFAULT_SF,
        slice_context: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_path = Path(output_path)
        self.prepare_settings = prepare_settings
        self.width_preset = width_preset
        self.network_overrides = dict(network_overrides or {})
        self.n_thresholds = n_thresholds
        self.sf = int(sf)
        self.slice_context = slice_context
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
        document = settings_document(threshold, self.prepare_settings, self.width_preset, self.network_overrides,
                                     metrics, self.sf, self.slice_context)
        atomic_write_json(self.output_path, document)

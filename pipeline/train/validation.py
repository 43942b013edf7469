"""Validation during training: when it runs (:func:`validation_due`, :class:`IntervalValidation`) and the synthetic-
anomaly health metric (:class:`SyntheticAnomalyAUROC`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.handlers import ValidationHandler
from monai.utils import IgniteInfo, min_version, optional_import

from pipeline.common.wrappers import unwrap
from pipeline.evaluate.metrics import roc_auc

__all__ = ["IntervalValidation", "SyntheticAnomalyAUROC", "validation_due"]

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")


def validation_due(interval: int):
    """An ignite event filter: every ``interval``-th epoch and the last one (so a run's final weights are always
    validated, and a run shorter than ``interval`` still selects a checkpoint)."""

    def due(engine: Any, epoch: int) -> bool:
        return epoch % interval == 0 or epoch == engine.state.max_epochs

    return due


class IntervalValidation(ValidationHandler):
    """MONAI's epoch-level ``ValidationHandler``, run every ``interval`` epochs *and at the last epoch*
    (:func:`validation_due`)."""

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=validation_due(self.interval)), self)
        if self.exec_at_start:
            engine.add_event_handler(Events.STARTED, self)


class SyntheticAnomalyAUROC:
    """Training health: pixel AUROC of the pretext task on a fixed set of synthesised validation slices.

    ``n_slices`` evenly spaced slices of ``dataset`` (validation items: ``image``, ``liver``, ``lesion``) get one
    synthetic anomaly each from ``synthesis`` (a ``RandLiverAnomalyd`` built like the training one, ``prob`` 1), drawn
    once with its own generator seeded by ``seed``: the same set at every call, and the training's random streams are
    untouched. The score is the pixel AUROC of the network's anomaly map against the synthetic mask over liver pixels
    outside real lesions. High here but low on the real lesions means "trained, but the pretext does not transfer";
    low here means "not trained yet".

    ``__call__(network)`` returns the AUROC (nan when no slice got an anomaly).
    """

    def __init__(self, dataset: Sequence[Mapping], synthesis: Any, n_slices: int = 32, seed: int = 0,
                 batch_size: int = 16) -> None:
        self.dataset, self.synthesis = dataset, synthesis
        self.n_slices, self.seed, self.batch_size = int(n_slices), int(seed), int(batch_size)
        self._set: dict[str, torch.Tensor] | None = None

    def _build(self) -> dict[str, torch.Tensor]:
        n = len(self.dataset)
        index = np.unique(np.linspace(0, n - 1, min(self.n_slices, n)).round().astype(int)) if n else []
        self.synthesis.set_random_state(seed=self.seed)
        items = [self.synthesis(dict(self.dataset[int(i)])) for i in index]
        keys = ("image", "anomaly_mask", "liver", "lesion")
        return {k: torch.stack([torch.as_tensor(item[k]).float() for item in items]) for k in keys} if items else {}

    @torch.no_grad()
    def __call__(self, network: torch.nn.Module) -> float:
        if self._set is None:
            self._set = self._build()
        if not self._set:
            return float("nan")
        net = unwrap(network)
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        maps = torch.cat(
            [net.anomaly_map(x.to(device)).float().cpu() for x in self._set["image"].split(self.batch_size)]
        )
        net.train(was_training)
        region = (self._set["liver"] > 0) & (self._set["lesion"] == 0)
        target = self._set["anomaly_mask"][region] > 0
        if not target.any() or target.all():
            return float("nan")
        return roc_auc(maps[region].numpy(), target.numpy())

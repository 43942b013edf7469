"""Mean anomaly map over several trained detectors and test-time flips (a seed ensemble, TTA).

Each detector is asked about the slice as it is and, for every flip in ``flips``, about the flipped slice; the flipped
answers are flipped back, so every map lies on the input's pixel grid, and the mean of all maps is returned. A mean of
softmax maps stays in [0, 1]; it is smoother than any single map, so a lesion threshold chosen for one model does not
carry over to the ensemble (``python -m pipeline infer`` asks for ``--threshold`` then).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["FLIP_CHOICES", "AveragedAnomalyMap"]

# Spatial flips of an axial slice (B, C, H, W): "lr" mirrors left-right (the W axis), "ud" up-down (the H axis).
FLIP_CHOICES: dict[str, tuple[int, ...]] = {"lr": (3,), "ud": (2,), "lrud": (2, 3)}


class AveragedAnomalyMap(nn.Module):
    """Mean of the anomaly maps of ``detectors``, each on the slice and on its ``flips``.

    Args:
        detectors: modules with ``anomaly_map(image (B, C, H, W) float in [0, 1]) -> (B, 1, H, W) float in [0, 1]``,
            e.g. :func:`pipeline.infer.settings.load_detector` of several seeds; at least one.
        flips: names from :data:`FLIP_CHOICES` (``"lr"``, ``"ud"``, ``"lrud"``); the unflipped slice is always used.

    ``anomaly_map`` (and ``forward``) return ``(B, 1, H, W)`` float in [0, 1]: the mean over
    ``len(detectors) * (1 + len(flips))`` maps. Network calls are ``len(detectors) * (1 + len(flips))`` times one.
    """

    def __init__(self, detectors: Sequence[nn.Module], flips: Sequence[str] = ()) -> None:
        super().__init__()
        if not detectors:
            raise ValueError("AveragedAnomalyMap needs at least one detector.")
        unknown = [f for f in flips if f not in FLIP_CHOICES]
        if unknown or len(set(flips)) != len(flips):
            raise ValueError(f"flips must be distinct names from {sorted(FLIP_CHOICES)}, got {list(flips)}.")
        self.detectors = nn.ModuleList(detectors)
        self.flip_dims: tuple[tuple[int, ...], ...] = ((),) + tuple(FLIP_CHOICES[f] for f in flips)

    @property
    def n_maps(self) -> int:
        """How many maps the mean is taken over."""
        return len(self.detectors) * len(self.flip_dims)

    def anomaly_map(self, image: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for detector in self.detectors:
            for dims in self.flip_dims:
                view = torch.flip(image, dims) if dims else image
                amap = detector.anomaly_map(view).float()
                amap = torch.flip(amap, dims) if dims else amap
                total = amap if total is None else total + amap
        assert total is not None  # the constructor requires a detector
        return total / self.n_maps

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.anomaly_map(image)

"""The overlay PNG of inference: the highest-scoring slices, CT in gray, heatmap in colour, lesion contours."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.common.files import atomic_write

__all__ = ["write_overlay"]


def write_overlay(
    path: Path, ct: np.ndarray, heatmap: np.ndarray, mask: np.ndarray, to_ras: np.ndarray,
    spacing: Sequence[float], slices: Sequence[tuple[int, float]], hu_window: Sequence[float], threshold: float,
) -> None:
    """PNG of ``slices`` ((RAS slice index, score) pairs): windowed CT in gray, heatmap in colour, lesion contours.

    ``ct``, ``heatmap`` and ``mask`` are on the input grid; ``to_ras`` is the nibabel orientation transform from it to
    RAS, ``spacing`` the in-plane spacing of the RAS grid. Slices are shown in radiological convention (patient right
    on the image's left, anterior up).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pipeline.common.display import (
        ras_to_display as view,  # RAS (x, y) -> rows from anterior, columns from patient right
    )

    ct_ras, heat_ras, mask_ras = (nib.orientations.apply_orientation(a, to_ras) for a in (ct, heatmap, mask))
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

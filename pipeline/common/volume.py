"""The in-memory form of one validated 3D image: its voxels, its voxel-to-world affine and where it came from.

:func:`pipeline.common.io.read_ct` and :func:`pipeline.common.io.read_label` return a :class:`Volume`; the grid
checks (:mod:`pipeline.common.grids`) compare two of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Volume"]


@dataclass
class Volume:
    """One validated 3D image as stored on disk.

    Attributes:
        array: ``(X, Y, Z)`` as stored (Fortran order for NIfTI: each axial slice contiguous), native byte order;
            float32 Hounsfield units for CT, uint8/int16/int32 for labels.
        affine: ``(4, 4)`` float64 voxel-to-world (RAS, mm) matrix, as nibabel reports it.
        path: the file (or DICOM series folder) it was read from.
        series_uid: the DICOM SeriesInstanceUID when read from a series folder, else None.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path
    series_uid: str | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes in mm along the three array axes (the affine's column norms)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

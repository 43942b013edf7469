"""Lesion candidates: the 3D connected components of the thresholded heatmap, small ones dropped, each described."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["lesion_candidates"]


def lesion_candidates(
    heatmap: np.ndarray, binary: np.ndarray, affine: np.ndarray, slice_axis: int, min_lesion_mm3: float
) -> tuple[np.ndarray, list[dict]]:
    """Drop 3D components (face connectivity) of ``binary`` under ``min_lesion_mm3``; describe the rest.

    Returns the kept mask (bool, ``binary``'s shape) and one dict per kept component, highest ``max_score`` first,
    numbered from 1 (``id``): ``voxels``, ``volume_ml``, ``centroid_voxel``, ``centroid_mm`` (through ``affine``),
    ``slice_range`` (along ``slice_axis``), ``max_score`` and ``mean_score`` (of ``heatmap``).
    """
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

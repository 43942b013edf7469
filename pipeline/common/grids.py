"""Checks between a CT and its label map: one voxel grid, a liver in the label, liver values in Hounsfield units.

:func:`label_on_image_grid` puts a label map on its CT's grid (as it is, reindexed, or resampled nearest-neighbour
when both cover the same physical extent) or refuses the pairing; :func:`check_liver_present` and
:func:`check_liver_hu` check what the label says about the CT. :func:`pipeline.common.io.load_case` runs all three.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from pipeline.common.volume import Volume
from transforms.errors import InputDataError

__all__ = [
    "LIVER_MEDIAN_HU_RANGE",
    "check_same_grid",
    "label_on_image_grid",
    "check_liver_present",
    "check_liver_hu",
]

# A liver's median in HU (contrast CT: about 50-150); outside this the CT is not in HU (raw values, an offset)
LIVER_MEDIAN_HU_RANGE = (-100.0, 300.0)


def check_same_grid(image: Volume, label: Volume, *, shape_only: bool = False, atol_mm: float = 1e-2) -> None:
    """Check that an image and its label map share one voxel grid.

    Args:
        image: the CT volume.
        label: its label map.
        shape_only: only compare shapes (for sources whose label headers are known to be unreliable).
        atol_mm: largest allowed world-position difference (mm) of any grid corner between the two affines.

    Raises:
        InputDataError: shapes differ (naming both files and shapes) or, unless ``shape_only``, the affines place
            some corner of the grid more than ``atol_mm`` apart (with the maximum difference in mm).
    """
    if image.array.shape != label.array.shape:
        raise InputDataError(label.path, f"label shape {label.array.shape} differs from the shape "
                                         f"{image.array.shape} of its image {image.path}.",
                             "pair each CT with its own segmentation, or resample the label onto the CT grid.")
    if shape_only:
        return
    shape = image.array.shape
    diff_mm = float(np.max(np.linalg.norm(_world_corners(image.affine, shape) - _world_corners(label.affine, shape),
                                          axis=0)))
    if not diff_mm <= atol_mm:
        raise InputDataError(label.path, f"label affine differs from the affine of its image {image.path}: grid "
                                         f"corners are up to {diff_mm:.3g} mm apart (tolerance {atol_mm:g} mm).",
                             "pair each CT with its own segmentation, or resample the label onto the CT grid "
                             "(nearest neighbour).")


def _world_corners(affine: np.ndarray, shape: Sequence[int], margin: float = 0.0) -> np.ndarray:
    """``(3, 8)`` world positions (mm) of a grid's corner voxel centres, moved outwards by ``margin`` voxels (0.5:
    the corners of the outer voxel faces)."""
    index = np.array(np.meshgrid(*[[-margin, n - 1 + margin] for n in shape], indexing="ij")).reshape(3, -1)
    return (affine @ np.vstack([index, np.ones(index.shape[1])]))[:3]


def _world_box(volume: Volume) -> np.ndarray:
    """``(2, 3)`` world-space bounding box (min, max; mm) of the grid's outer voxel faces."""
    world = _world_corners(volume.affine, volume.array.shape, margin=0.5)
    return np.stack([world.min(axis=1), world.max(axis=1)])


def label_on_image_grid(image: Volume, label: Volume) -> Volume:
    """The label map on the CT's voxel grid: as it is when the grids agree (:func:`check_same_grid`); reindexed
    exactly when it holds the same voxel centres in another axis order or direction (a CT read from DICOM, slices
    sorted by position, with a mask made on a converter's NIfTI that stores them top to bottom); resampled
    nearest-neighbour onto the CT grid when its voxels are of another size but both grids cover the same physical
    extent within the largest voxel edge of either (a mask made on a coarser grid, e.g. TotalSegmentator ``--fast``
    at 3 mm).

    Raises:
        InputDataError: the grids differ with equal voxel sizes (a wrong pairing or header: :func:`check_same_grid`'s
            error), or with other voxel sizes and other physical extents (naming both files and the difference in mm).
    """
    try:
        check_same_grid(image, label)
        return label
    except InputDataError as same_grid_error:
        to_label = _reindexing(image, label)
        # same voxel sizes (in any axis order): a shifted or cropped grid is a wrong pairing or header, never
        # resampled silently
        if to_label is None and np.allclose(sorted(image.spacing), sorted(label.spacing), rtol=0.01):
            raise
        box_image, box_label = _world_box(image), _world_box(label)
        tolerance = float(max(*image.spacing, *label.spacing))
        diff_mm = float(np.abs(box_image - box_label).max())
        if to_label is None and not diff_mm <= tolerance:
            raise InputDataError(label.path, f"{same_grid_error.problem} The label's voxels are of another size and "
                                             f"cover another part of space: the extents differ by up to "
                                             f"{diff_mm:.1f} mm (tolerance: the largest voxel, {tolerance:.2f} mm).",
                                 same_grid_error.fix) from None
    if to_label is None:
        to_label = np.linalg.inv(label.affine) @ image.affine
    # label index of every CT voxel centre; order 0 keeps label values (no interpolated classes)
    array = ndimage.affine_transform(label.array, to_label[:3, :3], offset=to_label[:3, 3],
                                     output_shape=image.array.shape, order=0, mode="constant", cval=0)
    return Volume(array, image.affine.copy(), label.path)


def _reindexing(image: Volume, label: Volume, atol_voxels: float = 0.05) -> np.ndarray | None:
    """The CT-index -> label-index map when both grids hold the same voxel centres, only in another axis order or
    direction: a signed permutation with an integer offset, within ``atol_voxels`` at every grid corner; else None."""
    exact = np.linalg.inv(label.affine) @ image.affine
    rounded = np.round(exact)
    permutation = np.abs(rounded[:3, :3])
    if not (np.all(permutation.sum(axis=0) == 1) and np.all(permutation.sum(axis=1) == 1)):
        return None
    corners = np.vstack([_world_corners(np.eye(4), image.array.shape), np.ones(8)])
    mapped, snapped = exact @ corners, rounded @ corners
    inside = np.all((snapped[:3] >= 0) & (snapped[:3] <= np.array(label.array.shape)[:, None] - 1))
    shapes_match = np.array_equal(permutation @ np.array(image.array.shape), np.array(label.array.shape))
    if inside and shapes_match and np.abs(mapped - snapped).max() <= atol_voxels:
        return rounded
    return None


def check_liver_present(label: Volume, liver_values: Sequence[int], lesion_values: Sequence[int] = ()) -> None:
    """Check that the label map contains at least one voxel of the configured liver or lesion values.

    Args:
        label: an integer label map from :func:`pipeline.common.io.read_label`.
        liver_values: label values that mean liver (e.g. 1 for LiTS/IRCADb, 5 for TotalSegmentator v2).
        lesion_values: label values that mean liver lesion (e.g. 2 for LiTS); they count as liver here.

    Raises:
        InputDataError: none of the configured values occurs, listing the values found and those configured.
    """
    configured = sorted({int(v) for v in (*liver_values, *lesion_values)})
    # value by value: np.isin would first copy the (Fortran-ordered) volume into a flat C-order array
    if any((label.array == v).any() for v in configured):
        return
    found = np.unique(label.array).tolist()
    raise InputDataError(label.path, f"no liver: the label map contains the values {_short_list(found)} but none of "
                                     f"the configured liver values {sorted(liver_values)} or lesion values "
                                     f"{sorted(lesion_values)}.",
                         "set --liver-values/--lesion-values (or the dataset preset) to this dataset's convention, "
                         "or drop scans that do not cover the liver.")


def check_liver_hu(image: Volume, label: Volume, liver_values: Sequence[int],
                   lesion_values: Sequence[int] = ()) -> float:
    """Check that the liver's median lies in :data:`LIVER_MEDIAN_HU_RANGE` (about -100 to 300 HU) and return it.

    A CT whose values are not HU (stored values without the rescale intercept: liver ~1080; an offset or scaled
    export) passes the whole-volume checks of :func:`pipeline.common.io.read_ct` when it has no air, yet every liver
    pixel would be windowed to 1.0. Needs a liver voxel (:func:`check_liver_present` first).

    Raises:
        InputDataError: naming the CT, with the median found and the likely causes.
    """
    inside = np.zeros(label.array.shape, dtype=bool)
    for v in (*liver_values, *lesion_values):
        inside |= label.array == v
    median = float(np.median(image.array[inside])) if inside.any() else float("nan")
    low, high = LIVER_MEDIAN_HU_RANGE
    if not low <= median <= high:
        hint = (" (stored values without the -1024 rescale intercept?)" if median > high else "")
        raise InputDataError(image.path, f"the liver's median is {median:g}, outside the {low:g} to {high:g} HU of a "
                                         f"liver on CT{hint}.",
                             "export the CT in Hounsfield units (apply RescaleSlope/RescaleIntercept), and check that "
                             "the label map belongs to this CT.")
    return median


def _short_list(values: list[int], limit: int = 20) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"

"""Validated NIfTI input and atomic output: the pipeline's only door to files.

Every CT or label the pipeline reads goes through :func:`read_ct` / :func:`read_label` (or :func:`load_case`, which
runs both plus the pairing checks), and every file it writes goes through :func:`atomic_write` (a temporary name in
the same folder, then ``os.replace``), so an interrupted run never leaves a half-written output behind.

Problems with the data are always raised as :class:`transforms.errors.InputDataError` naming the file, the problem
and a fix; errors from numpy, nibabel or gzip are re-raised ``from`` the original, never leaked as a bare traceback.

Files are decoded from memory: the bytes are read once, gunzipped when they start with the gzip magic (whatever the
extension says, so a plain ``.nii`` named ``.nii.gz`` loads correctly) and parsed with ``nibabel``'s ``from_bytes``.
The data are read fully inside the error handling, because nibabel reads lazily and a truncated file would otherwise
only fail later, deep inside a transform.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import secrets
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import convert_to_numpy
from monai.utils.enums import SpaceKeys
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError
from scipy import ndimage

from transforms.errors import InputDataError

__all__ = [
    "Volume",
    "read_ct",
    "read_label",
    "check_same_grid",
    "label_on_image_grid",
    "check_liver_present",
    "load_case",
    "read_case_ids_unique",
    "ensure_output_dir",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "save_nifti",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Largest deviation of a voxel axis from the nearest world axis that is still treated as axis-aligned. The 2D slice
# model assumes axial slices; at 1 degree a 400 mm field drifts by 7 mm across the volume, beyond that it is a tilt.
MAX_OBLIQUE_DEG = 1.0
# Scanners pad outside the reconstruction circle with -1024, -2048, -3024 or -32768, so a tighter lower bound would
# refuse real scans; values outside the int16 range that CT scanners store cannot be Hounsfield units.
HU_PLAUSIBLE_RANGE = (-32768.0, 32767.0)
# Soft tissue is 0-100 HU and every body CT contains air or fat below 0 HU; stored values without the rescale
# intercept (about -1024) start at 0 and put soft tissue near 1000.
RAW_MIN_MAX_ABOVE = 2000.0
RAW_MEDIAN_ABOVE = 500.0
MEDIAN_SAMPLES = 1_000_000
LABEL_DTYPES = (np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.int32))
# Resource and plausibility limits, each overridable by an environment variable (for the CLI, the bundle and the
# MONAI Label server alike): the voxel count a header may declare before anything is decompressed (a 261 KB .nii.gz
# can unpack to 512^3; 600 M voxels is a 512 x 512 x 2290 whole-body CT), and the voxel spacing in mm (below 0.1 mm
# or above 20 mm is a header error such as spacing stored in metres, and would make the liver ROI allocate
# gigabytes or count every voxel as a lesion of min_lesion_mm3).
MAX_VOXELS_ENV, MAX_VOXELS_DEFAULT = "HEPAFAIR_MAX_VOXELS", 600_000_000
SPACING_RANGE_ENV, SPACING_RANGE_DEFAULT_MM = "HEPAFAIR_SPACING_RANGE_MM", (0.1, 20.0)
# A liver's median in HU (contrast CT: about 50-150); outside this the CT is not in HU (raw values, an offset)
LIVER_MEDIAN_HU_RANGE = (-100.0, 300.0)
# nibabel's own default: level 1 writes a 512x512x100 volume in well under a second at a few % larger files.
GZIP_LEVEL = 1

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_HEADER_SIZE = 348
_NIFTI2_HEADER_SIZE = 540
_KNOWN_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89HDF", "an HDF5 file"),
    (b"\x93NUMPY", "a NumPy .npy file"),
    (b"PK\x03\x04", "a ZIP archive (e.g. .npz)"),
    (b"NRRD", "an NRRD file"),
)
# Everything nibabel, numpy or the stdlib raise for a damaged or hostile file while parsing it from memory.
_PARSE_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, MemoryError, ImageFileError, HeaderDataError,
                 WrapStructError)


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


def read_ct(path: str | os.PathLike, *, check_hu: bool = True, series_uid: str | None = None) -> Volume:
    """Read and validate a CT volume in Hounsfield units, from a NIfTI file or a DICOM series folder.

    Checks (each an :class:`InputDataError` naming the file): everything :func:`read_label` checks about the file and
    its geometry (existence, NIfTI format, 3D shape, spacing, axis-aligned orientation), then no NaN/Inf voxels and,
    when ``check_hu``, that the values are plausible Hounsfield units: stored in a type wider than 8 bits, not
    already normalised to about [0, 1], not raw stored values missing the rescale slope/intercept (no voxel below
    0 with a maximum above 2000, or a median above 500), and within the int16 range scanners store.

    Oblique acquisitions (a voxel axis more than 1 degree from the nearest world axis) are refused, because the
    pipeline slices axially: resample them to an axis-aligned grid first, e.g. with ``SimpleITK.Resample`` onto an
    identity direction.

    A folder is read as a DICOM series (:func:`pipeline.common.dicom.read_series`: sorted by position, rescale
    slope/intercept applied, its own header checks), then checked like a NIfTI.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file (a 4D file with a trailing singleton dimension is squeezed to 3D), or a
            folder holding a DICOM CT series.
        check_hu: run the Hounsfield-unit plausibility checks (NaN/Inf are always refused).
        series_uid: which series of a DICOM folder to read (needed when it holds several).

    Returns:
        Volume with ``array`` ``(X, Y, Z)`` float32 HU (the header's ``scl_slope``/``scl_inter`` or the DICOM
        RescaleSlope/RescaleIntercept applied) and, for DICOM, ``series_uid``.
    """
    if Path(path).is_dir():
        from pipeline.common.dicom import read_series  # SimpleITK is imported only when a series is read

        path, array, affine, series_uid = read_series(path, series_uid, max_voxels=max_voxels())
        _check_affine(path, affine)
    elif series_uid is not None:
        raise InputDataError(path, f"a series UID ({series_uid}) was given, but the CT is a NIfTI file, not a DICOM "
                                   "series folder.", "drop the series UID, or pass the series' folder.")
    else:
        path, array, affine = _read_nifti(path)
    low, high = _min_max(array)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InputDataError(path, f"contains {_count_non_finite(array)}; a CT needs a finite HU value in every "
                                   "voxel.",
                             "re-export the scan; if NaN/Inf marks outside the field of view, fill it with -1024.")
    if check_hu:
        _check_hounsfield(path, array, low, high)
    return Volume(_native(array, np.float32), affine, path, series_uid)


def read_label(path: str | os.PathLike) -> Volume:
    """Read and validate an integer label map (organ / lesion classes).

    Checks the file (exists, is a readable NIfTI, is not truncated), its geometry (3D after squeezing a trailing
    singleton 4th dimension, positive finite spacing, finite non-singular affine, at most 1 degree oblique) and its
    values: no NaN, no fractions, no negative values. Float label maps with integral values are accepted.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        Volume with ``array`` ``(X, Y, Z)`` of integer dtype: uint8, int16 or int32 kept as stored, other types
        (bool, int8, uint16, int64, float, big-endian...) converted to the smallest of these that holds the values.
    """
    path, array, affine = _read_nifti(path)
    low, high = _min_max(array)
    if array.dtype.kind == "f":
        if np.isnan(low) or np.isnan(high):
            raise InputDataError(path, "label map contains NaN values.", "re-export the segmentation as integers.")
        if np.any(array != np.round(array)):
            raise InputDataError(path, "label map has non-integer (fractional) values; it looks like an image or an "
                                       "interpolated mask, not a label map.",
                                 "pass the segmentation file; resample labels with nearest-neighbour interpolation.")
    if low < 0:
        raise InputDataError(path, f"label map has negative values (min {low:g}); labels must be 0 (background) "
                                   "or positive class values.", "re-export the segmentation with non-negative labels.")
    # dtype equality includes byte order, so big-endian data are converted too (torch needs native order)
    dtype = array.dtype if array.dtype in LABEL_DTYPES else _smallest_label_dtype(path, high)
    return Volume(_native(array, dtype), affine, path)


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
        label: an integer label map from :func:`read_label`.
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


def load_case(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
    liver_values: Sequence[int],
    lesion_values: Sequence[int] = (),
    series_uid: str | None = None,
) -> dict[str, MetaTensor]:
    """Read a CT and its label map, run every check, and return them as MONAI would load them.

    The result matches ``LoadImaged(reader="NibabelReader") + EnsureChannelFirstd``, so ``Orientationd``,
    ``Spacingd`` and ``Invertd`` work on it: both tensors carry meta ``affine`` (torch float64 4x4),
    ``original_affine``, ``spatial_shape``, ``space`` ("RAS"), ``original_channel_dim`` and ``filename_or_obj``.

    Args:
        image_path: CT NIfTI in Hounsfield units, or a DICOM series folder (:func:`read_ct`).
        label_path: label NIfTI on the same grid, or on another grid covering the same extent (resampled
            nearest-neighbour onto the CT's, :func:`label_on_image_grid`).
        liver_values: label values meaning liver.
        lesion_values: label values meaning liver lesion.
        series_uid: which series of a DICOM folder to read (needed when it holds several).

    Returns:
        ``{"image": MetaTensor (1, X, Y, Z) float32 HU, "label": MetaTensor (1, X, Y, Z) uint8/int16/int32}``; a CT
        read from DICOM has its SeriesInstanceUID in the image's meta ``series_uid``.
    """
    image = read_ct(image_path, series_uid=series_uid)
    label = label_on_image_grid(image, read_label(label_path))
    check_liver_present(label, liver_values, lesion_values)
    check_liver_hu(image, label, liver_values, lesion_values)
    return {"image": _to_meta_tensor(image), "label": _to_meta_tensor(label)}


def check_liver_hu(image: Volume, label: Volume, liver_values: Sequence[int],
                   lesion_values: Sequence[int] = ()) -> float:
    """Check that the liver's median lies in :data:`LIVER_MEDIAN_HU_RANGE` (about -100 to 300 HU) and return it.

    A CT whose values are not HU (stored values without the rescale intercept: liver ~1080; an offset or scaled
    export) passes the whole-volume checks of :func:`read_ct` when it has no air, yet every liver pixel would be
    windowed to 1.0. Needs a liver voxel (:func:`check_liver_present` first).

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


def read_case_ids_unique(case_ids: Sequence[str], paths: Sequence[str | os.PathLike]) -> None:
    """Check that no case id is used twice (e.g. ``case_001.nii.gz`` in two folders of one dataset).

    Args:
        case_ids: one id per discovered case.
        paths: the file each id came from, same length as ``case_ids``.

    Raises:
        InputDataError: on the first repeated id, naming both files.
    """
    if len(case_ids) != len(paths):
        raise ValueError(f"got {len(case_ids)} case ids for {len(paths)} paths.")
    first_seen: dict[str, str | os.PathLike] = {}
    for case_id, path in zip(case_ids, paths):
        if case_id in first_seen:
            raise InputDataError(path, f"case id {case_id!r} is used by both {first_seen[case_id]} and {path}.",
                                 "rename one of the files or keep each dataset in its own folder.")
        first_seen[case_id] = path


#: Longest case id accepted: it becomes a folder name and a file-name prefix.
CASE_ID_MAX_LENGTH = 128
_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_CASE_ID_HINT = ("a case id must be one file name: letters, digits and . _ + - (not first), no folders, at most "
                 f"{CASE_ID_MAX_LENGTH} characters.")


def check_case_id(case_id: Any, source: str | os.PathLike | None = None) -> str:
    """Return ``case_id`` if it is safe as one path component, else raise.

    Case ids become folder names (``prepare``) and file-name prefixes (``infer``); one that held a separator, ``..``
    or an absolute path would make those writes land outside the output folder. Accepted: ``[A-Za-z0-9]`` first, then
    ``[A-Za-z0-9._+-]``, at most :data:`CASE_ID_MAX_LENGTH` characters.

    Raises:
        InputDataError: not a string, empty, too long, or with any other character (names ``source``).
    """
    if not isinstance(case_id, str):
        raise InputDataError(source, f"case id {case_id!r} is a {type(case_id).__name__}, not a string.", _CASE_ID_HINT)
    if len(case_id) > CASE_ID_MAX_LENGTH:
        raise InputDataError(source, f"case id {case_id[:40]!r}... is {len(case_id)} characters long.", _CASE_ID_HINT)
    if not _CASE_ID.fullmatch(case_id):
        raise InputDataError(source, f"case id {case_id!r} cannot be used as a file name.", _CASE_ID_HINT)
    return case_id


def case_id_from_name(name: str) -> str:
    """A safe case id (:func:`check_case_id`) made from a file name stem: every run of other characters becomes
    ``_``, leading ``._+-`` are dropped, the result is cut to :data:`CASE_ID_MAX_LENGTH` (``"case"`` if nothing is
    left). ``volume-12`` and ``ircadb_p17`` stay as they are."""
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).lstrip("._+-")[:CASE_ID_MAX_LENGTH]
    return safe or "case"


def inside_folder(folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` if it resolves to a place strictly inside ``folder`` (links followed), else raise ``InputDataError``:
    the last line of defence before anything is written, renamed or removed."""
    root, target = Path(folder).resolve(), Path(path).resolve()
    if target == root or root not in target.parents:
        raise InputDataError(path, f"refusing to write outside the output folder {root}.",
                             "check the case id and the output folder.")
    return Path(path)


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create an output folder (with parents) if needed and check that it can be written to.

    Raises:
        InputDataError: the path is an existing file, cannot be created, or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputDataError(path, "output path exists and is a file, not a folder.",
                             "choose another output folder or remove the file.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputDataError(path, f"cannot create the output folder ({exc.strerror}).",
                             "choose an output folder in a writable location.") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputDataError(path, "output folder is not writable.", "choose another output folder or fix its "
                                                                     "permissions.")
    return path


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], None]) -> Path:
    """Write a file atomically: ``write_fn`` writes a temporary file in the same folder, which then replaces ``path``.

    The temporary name keeps the target's suffixes (``.nii.gz`` stays last), so writers that choose the format from
    the extension work. On any error the temporary file is removed and ``path`` is left untouched.

    Args:
        path: the final file; its folder must exist (see :func:`ensure_output_dir`).
        write_fn: called once with the temporary path; must create that file.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        InputDataError: the folder is missing, or writing/replacing fails with an OS error (disk full, permissions,
            ``path`` is a folder). Other exceptions from ``write_fn`` propagate unchanged.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise InputDataError(path, "cannot write: the output folder does not exist.",
                             "create it first (ensure_output_dir) or choose another output path.")
    temp = path.with_name(f".tmp-{secrets.token_hex(6)}-{path.name}")
    try:
        write_fn(temp)
        # flush to disk before the rename, otherwise a crash could leave a complete name with incomplete content
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as exc:
        raise InputDataError(path, f"cannot write the file ({exc.strerror or exc}).",
                             "check free disk space and permissions of the output folder.") from exc
    finally:
        temp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path`` (see :func:`atomic_write`)."""
    return atomic_write(path, lambda temp: temp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Atomically write ``obj`` as strict UTF-8 JSON with a trailing newline: numpy/torch scalars and arrays and paths
    become plain JSON values, and undefined numbers (NaN, +-Inf) become ``null``, so strict readers accept every
    file the project writes."""
    plain = _non_finite_to_none(json.loads(json.dumps(obj, default=_json_default)))
    text = json.dumps(plain, indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_nifti(
    path: str | os.PathLike,
    array: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    *,
    dtype: np.dtype | type | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a 3D array as NIfTI-1, atomically and reproducibly.

    ``.nii.gz`` is gzipped with a zero timestamp and no file name in the gzip header, so identical data give
    byte-identical files. The affine is written to both sform and qform (code 1, scanner), as MONAI's writer does.

    Args:
        path: target ``.nii`` or ``.nii.gz``.
        array: ``(X, Y, Z)`` numpy array or tensor (drop a channel dimension first).
        affine: ``(4, 4)`` voxel-to-world matrix.
        dtype: on-disk dtype; by default the array's, except bool -> uint8, float64 -> float32 and
            int64/uint64 -> int32 (refused when the values do not fit).
        overwrite: replace an existing file; otherwise an existing ``path`` is an error.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise InputDataError(path, "output file name must end in .nii or .nii.gz.", "rename the output path.")
    if path.exists() and not overwrite:
        raise InputDataError(path, "output file already exists.",
                             "pass --overwrite (overwrite=True) to replace it, or choose another output folder.")
    data = np.asarray(convert_to_numpy(array))
    matrix = np.asarray(convert_to_numpy(affine), dtype=np.float64)
    if data.ndim != 3:
        raise InputDataError(path, f"can only save a 3D (X, Y, Z) array, got shape {data.shape}.",
                             "drop the channel/batch dimensions first (e.g. array[0]).")
    if matrix.shape != (4, 4):
        raise InputDataError(path, f"affine must be 4x4, got shape {matrix.shape}.")
    out_dtype = _output_dtype(path, data, dtype)
    image = nib.Nifti1Image(data.astype(out_dtype, copy=False), matrix, dtype=out_dtype)
    image.set_sform(matrix, code=1)
    image.set_qform(matrix, code=1)
    image.header.set_xyzt_units("mm", "sec")
    payload = image.to_bytes()
    if path.name.lower().endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=GZIP_LEVEL, mtime=0)
    return atomic_write_bytes(path, payload)


# ----------------------------------------------------------------------------------------------------------- reading


def max_voxels() -> int:
    """The largest voxel count a NIfTI header may declare (``HEPAFAIR_MAX_VOXELS``, default 600 M)."""
    return _env_number(MAX_VOXELS_ENV, MAX_VOXELS_DEFAULT, int)


def spacing_range_mm() -> tuple[float, float]:
    """Accepted voxel spacing in mm, every axis (``HEPAFAIR_SPACING_RANGE_MM="MIN,MAX"``, default 0.1,20)."""
    text = os.environ.get(SPACING_RANGE_ENV)
    if not text:
        return SPACING_RANGE_DEFAULT_MM
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        low = high = float("nan")
    if not 0 < low < high < float("inf"):
        raise InputDataError(None, f"{SPACING_RANGE_ENV}={text!r} is not 'MIN,MAX' with 0 < MIN < MAX (mm).")
    return low, high


def _env_number(name: str, default: Any, kind: type) -> Any:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise InputDataError(None, f"{name}={text!r} is not a positive {kind.__name__}.")
    return value


def _read_nifti(path: str | os.PathLike) -> tuple[Path, np.ndarray, np.ndarray]:
    """Read ``path`` into ``(path, array (X, Y, Z) as stored with scaling applied, affine)`` with all file and
    geometry checks. The header is parsed and checked (shape, voxel count against :func:`max_voxels`, spacing)
    before the voxel data are decompressed."""
    path = Path(path)
    raw = _read_bytes(path)
    _, header, stored_shape = _sniff_header(path, _decompress(path, raw, limit=_NIFTI2_HEADER_SIZE), header_only=True)
    shape = _checked_shape(path, stored_shape)
    _check_pixdim(path, header)
    _check_voxel_budget(path, shape, header)
    data = _decompress(path, raw)
    image_class, header, stored_shape = _sniff_header(path, data)
    try:
        image = image_class.from_bytes(data)
        affine = np.asarray(image.affine, dtype=np.float64)
        array = np.asanyarray(image.dataobj)  # forces the lazy proxy to read everything now, inside the handler
    except _PARSE_ERRORS as exc:
        raise InputDataError(path, f"corrupt or truncated NIfTI ({type(exc).__name__}: {_first_line(exc)}).",
                             "re-export or re-download the file.") from exc
    if array.dtype.kind not in "biuf":
        raise InputDataError(path, f"voxel type {array.dtype} is not a scalar number type (RGB or complex data).",
                             "export a single-channel grey-value / label image.")
    _check_affine(path, affine)
    return path, array.reshape(shape), affine


def _read_bytes(path: Path) -> bytes:
    if path.is_dir():  # CTs in folders (DICOM) never get here: read_ct reads those as series
        raise InputDataError(path, "is a folder, not a NIfTI file; label maps are NIfTI files.",
                             "pass the label map's .nii.gz (a TotalSegmentator output folder is accepted as a "
                             "case's label).")
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise InputDataError(path, "not a NIfTI file name (expected .nii or .nii.gz).",
                             "convert the image to NIfTI, e.g. with SimpleITK.WriteImage(image, 'case.nii.gz').")
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise InputDataError(path, "file not found.", "check the path and the dataset folder.") from exc
    except PermissionError as exc:
        raise InputDataError(path, "cannot read the file: permission denied.", "fix the file permissions.") from exc
    except OSError as exc:
        raise InputDataError(path, f"cannot read the file ({exc.strerror or exc}).") from exc


def _decompress(path: Path, raw: bytes, limit: int | None = None) -> bytes:
    """The file's bytes, gunzipped when gzip; with ``limit``, only the first ``limit`` bytes (the header) are
    decompressed."""
    if not raw.startswith(_GZIP_MAGIC):
        return raw if limit is None else raw[:limit]
    try:
        if limit is not None:
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw, limit)
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputDataError(path, f"truncated or corrupt gzip data ({_first_line(exc)}).",
                             "re-download or re-export the file; an interrupted copy is the usual cause.") from exc


def _sniff_header(path: Path, data: bytes, header_only: bool = False
                  ) -> tuple[type[nib.Nifti1Image], nib.Nifti1Header, tuple[int, ...]]:
    """Identify NIfTI-1/-2 from the header size or magic and parse the header (and the stored shape) without
    nibabel's silent fixes, so that e.g. a negative pixdim is seen as written. ``header_only``: ``data`` is just the
    start of the file; the header extensions after it are not read."""
    if not data:
        raise InputDataError(path, "not a NIfTI file: the file is empty.", "re-export or re-download the file.")
    if len(data) < _NIFTI1_HEADER_SIZE:
        raise InputDataError(path, f"not a NIfTI file: {_describe_content(data)}; {len(data)} bytes is shorter than "
                                   "a NIfTI header.",
                             "convert the image to NIfTI (.nii.gz), or re-download it if the copy was cut short.")
    sizes = {int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")}
    if _NIFTI2_HEADER_SIZE in sizes or data[4:8] == b"n+2\x00":
        image_class, header_class = nib.Nifti2Image, nib.Nifti2Header
    elif _NIFTI1_HEADER_SIZE in sizes or data[344:348] in (b"n+1\x00", b"ni1\x00"):
        image_class, header_class = nib.Nifti1Image, nib.Nifti1Header
    else:
        raise InputDataError(path, f"not a NIfTI file: {_describe_content(data)}.",
                             "convert the image to NIfTI (.nii.gz), e.g. with SimpleITK.WriteImage.")
    if header_only:
        data = data[: _NIFTI2_HEADER_SIZE if header_class is nib.Nifti2Header else _NIFTI1_HEADER_SIZE]
    try:
        header = header_class.from_fileobj(io.BytesIO(data), check=False)
        magic = bytes(header["magic"])
        shape = tuple(int(n) for n in header.get_data_shape())
    except _PARSE_ERRORS as exc:
        raise InputDataError(path, f"corrupt NIfTI header ({_first_line(exc)}).",
                             "re-export or re-download the file.") from exc
    if magic.startswith(b"ni"):
        raise InputDataError(path, "header of a two-file NIfTI (.hdr/.img pair), the voxel data are elsewhere.",
                             "convert the pair to a single .nii.gz, e.g. with nibabel or SimpleITK.")
    return image_class, header, shape


def _checked_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Return the 3D shape to read the data as: trailing singleton dimensions (X, Y, Z, 1) are dropped."""
    if len(shape) < 3:
        raise InputDataError(path, f"{len(shape)}D image of shape {shape}, expected a 3D volume.",
                             "stack the slices into one 3D NIfTI volume.")
    if any(n <= 0 for n in shape):
        raise InputDataError(path, f"invalid image shape {shape}: zero or negative dimensions.",
                             "re-export the scan.")
    if any(n != 1 for n in shape[3:]):
        if len(shape) == 4:
            raise InputDataError(path, f"4D series of {shape[3]} volumes (shape {shape}), expected one 3D volume.",
                                 "split the series into one 3D file per volume, e.g. with nibabel.four_to_three.")
        raise InputDataError(path, f"{len(shape)}D image of shape {shape} (vector or multi-component data), "
                                   "expected a 3D volume.", "export a single scalar 3D volume.")
    return shape[0], shape[1], shape[2]


def _check_voxel_budget(path: Path, shape: tuple[int, int, int], header: nib.Nifti1Header) -> None:
    """Refuse a header that declares more voxels than :func:`max_voxels`, before the data are decompressed."""
    n_voxels, limit = int(np.prod(shape, dtype=np.int64)), max_voxels()
    if n_voxels > limit:
        itemsize = np.dtype(header.get_data_dtype()).itemsize
        raise InputDataError(path, f"the header declares {shape[0]} x {shape[1]} x {shape[2]} = {n_voxels:,} voxels "
                                   f"({n_voxels * itemsize / 2**30:.1f} GiB once decompressed), above the limit of "
                                   f"{limit:,} voxels.",
                             f"if this is a real scan, raise the limit: {MAX_VOXELS_ENV}={n_voxels} (environment).")


def _check_pixdim(path: Path, header: nib.Nifti1Header) -> None:
    spacing = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    finite = np.isfinite(spacing)
    problems = [name for name, bad in (("NaN/Inf", ~finite), ("zero", spacing == 0), ("negative", spacing < 0))
                if np.any(bad)]
    if problems:
        shown = [round(float(v), 6) for v in spacing]
        raise InputDataError(path, f"{' and '.join(problems)} voxel spacing {shown} mm in the header (pixdim); "
                                   "spacing must be positive and finite.",
                             "re-export the scan, or set the spacing, e.g. with nibabel header.set_zooms.")


def _check_affine(path: Path, affine: np.ndarray) -> None:
    """Refuse non-finite, singular and oblique voxel-to-world matrices (see :func:`read_ct`)."""
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputDataError(path, "voxel-to-world affine has non-finite (NaN/Inf) entries.",
                             "re-export the scan with a valid orientation (sform/qform).")
    columns = affine[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing < 1e-6) or abs(np.linalg.det(columns)) < 1e-12:
        raise InputDataError(path, f"singular voxel-to-world affine (zero voxel spacing, axis norms "
                                   f"{np.round(spacing, 6).tolist()} mm).",
                             "re-export the scan with a valid orientation and spacing (sform/qform).")
    low, high = spacing_range_mm()
    if np.any(spacing < low) or np.any(spacing > high):
        raise InputDataError(path, f"implausible voxel spacing {np.round(spacing, 6).tolist()} mm (accepted: "
                                   f"{low:g} to {high:g} mm per axis): a header error such as spacing stored in "
                                   "metres, or slices too thick to find lesions in.",
                             "fix the spacing in the header (nibabel header.set_zooms / the sform); for a real scan "
                             f"outside the range set {SPACING_RANGE_ENV}=MIN,MAX (environment).")
    cosines = np.abs(columns / spacing)
    nearest_axes = np.argmax(cosines, axis=0)
    degrees = np.degrees(np.arccos(np.clip(cosines.max(axis=0), -1.0, 1.0)))
    if len(set(nearest_axes.tolist())) < 3 or np.max(degrees) > MAX_OBLIQUE_DEG:
        raise InputDataError(path, f"oblique volume: voxel axes are up to {np.max(degrees):.1f} degrees off the "
                                   f"nearest world axis (tolerance {MAX_OBLIQUE_DEG:g} degree); axial slicing needs "
                                   "an axis-aligned grid.",
                             "resample to an axis-aligned grid, e.g. SimpleITK.Resample(image, reference) with a "
                             "reference of identity direction covering the same region, then save as NIfTI.")


# ---------------------------------------------------------------------------------------------------------- checking


def _min_max(array: np.ndarray) -> tuple[float, float]:
    """Min and max as floats; NaN anywhere makes both NaN, +/-Inf shows up in them, so no separate isfinite pass."""
    return float(np.min(array)), float(np.max(array))


def _check_hounsfield(path: Path, array: np.ndarray, low: float, high: float) -> None:
    if array.dtype.kind == "b" or array.dtype.itemsize == 1:
        raise InputDataError(path, f"voxel type {array.dtype}: integer type too small for HU (-1024 to 3071 needs "
                                   "at least 16 bits); this looks like a screenshot or a windowed export.",
                             "export the original CT in Hounsfield units (int16 or float32).")
    if high - low < 10 and not (low >= -0.1 and high <= 1.1):
        raise InputDataError(path, f"values span only [{low:g}, {high:g}] HU: a blank volume without anatomy (e.g. "
                                   "an export of the padding only).",
                             "export the CT itself, in Hounsfield units.")
    if low >= -0.1 and high <= 1.1:
        raise InputDataError(path, f"values span only [{low:g}, {high:g}]: looks normalised (e.g. to [0,1]), "
                                   "expected Hounsfield units (air -1000, water 0, liver ~60).",
                             "pass the original CT in HU, not a preprocessed one; or use check_hu=False.")
    if low < HU_PLAUSIBLE_RANGE[0] or high > HU_PLAUSIBLE_RANGE[1]:
        raise InputDataError(path, f"values [{low:g}, {high:g}] are far outside the Hounsfield range "
                                   f"{list(HU_PLAUSIBLE_RANGE)} that CT scanners store.",
                             "check the rescale slope/intercept (scl_slope/scl_inter) of the export.")
    if high > RAW_MEDIAN_ABOVE:
        flat = array.ravel(order="K")
        median = float(np.median(flat[:: max(1, flat.size // MEDIAN_SAMPLES)]))
        if (low >= 0 and high > RAW_MIN_MAX_ABOVE) or median > RAW_MEDIAN_ABOVE:
            raise InputDataError(path, f"values [{low:g}, {high:g}] with median {median:g}: looks like stored values "
                                       "without the rescale slope/intercept (air should be about -1000 HU, soft "
                                       "tissue 0-100 HU).",
                                 "apply the DICOM RescaleSlope/RescaleIntercept (usually HU = value - 1024), or set "
                                 "scl_slope/scl_inter in the NIfTI header.")


def _count_non_finite(array: np.ndarray) -> str:
    nan = int(np.count_nonzero(np.isnan(array)))
    inf = int(np.count_nonzero(np.isinf(array)))
    counts = ((nan, "NaN"), (inf, "Inf"))
    return " and ".join(f"{count} {name} voxel{'s' if count > 1 else ''}" for count, name in counts if count)


def _smallest_label_dtype(path: Path, high: float) -> np.dtype:
    for dtype in LABEL_DTYPES:
        if high <= np.iinfo(dtype).max:
            return dtype
    raise InputDataError(path, f"label value {high:g} does not fit in int32.", "renumber the labels.")


def _output_dtype(path: Path, data: np.ndarray, dtype: np.dtype | type | str | None) -> np.dtype:
    if dtype is not None:
        return np.dtype(dtype)
    if data.dtype.kind == "b":
        return np.dtype(np.uint8)
    if data.dtype == np.float64:
        return np.dtype(np.float32)
    if data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise InputDataError(path, f"{data.dtype} values do not fit in int32, the widest integer type written.",
                                 "pass an explicit dtype.")
        return np.dtype(np.int32)
    return data.dtype


# ---------------------------------------------------------------------------------------------------------- helpers


def _to_meta_tensor(volume: Volume) -> MetaTensor:
    """``(X, Y, Z)`` volume -> ``(1, X, Y, Z)`` MetaTensor with the meta keys LoadImaged + EnsureChannelFirstd set."""
    meta = {
        "original_affine": volume.affine.copy(),
        "spatial_shape": np.asarray(volume.array.shape),
        "space": SpaceKeys.RAS,
        "original_channel_dim": float("nan"),  # what LoadImage records for channel-less images
        "filename_or_obj": str(volume.path),
    }
    if volume.series_uid is not None:
        meta["series_uid"] = volume.series_uid
    affine = torch.as_tensor(volume.affine, dtype=torch.float64)
    return MetaTensor(torch.from_numpy(volume.array[None]), affine=affine, meta=meta)


def _native(array: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """``array`` as ``dtype`` in native byte order, keeping its memory layout (no copy when nothing changes).

    NIfTI data are Fortran-ordered: (X, Y, Z) with X fastest, i.e. each axial slice is one contiguous block. That is
    the layout slicing wants, so it is kept: a C-order copy cost ~0.25 s per 512x512x119 volume only for the ROI
    step to transpose it back to slices-first. numpy, torch and MONAI handle either layout.
    """
    return np.asarray(array, dtype=dtype, order="K")


def _describe_content(data: bytes) -> str:
    for signature, name in _KNOWN_SIGNATURES:
        if data.startswith(signature):
            return f"the content is {name}"
    if data[128:132] == b"DICM":
        return "the content is a DICOM file"
    head = data[:_NIFTI1_HEADER_SIZE]
    if head and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        return f"the content is text, starting {head[:40].decode('ascii')!r}"
    return "no NIfTI header size (348/540) or magic ('n+1'/'n+2') found"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _short_list(values: list[int], limit: int = 20) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _non_finite_to_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _non_finite_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_non_finite_to_none(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")

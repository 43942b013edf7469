"""Validated NIfTI input and reproducible NIfTI output: the pipeline's only door to image files.

Every CT or label the pipeline reads goes through :func:`read_ct` / :func:`read_label` (or :func:`load_case`, which
runs both plus the pairing checks of :mod:`pipeline.common.grids`), and every NIfTI it writes goes through
:func:`save_nifti`, which writes atomically (:func:`pipeline.common.files.atomic_write`).

Problems with the data are always raised as :class:`transforms.errors.InputDataError` naming the file, the problem
and a fix; errors from numpy, nibabel or gzip are re-raised ``from`` the original, never leaked as a bare traceback.

Files are decoded from memory: the bytes are read once, gunzipped when they start with the gzip magic (whatever the
extension says, so a plain ``.nii`` named ``.nii.gz`` loads correctly) and parsed with ``nibabel``'s ``from_bytes``.
The header is checked (:mod:`pipeline.common.volume_checks`) before the voxel data are decompressed. The data are
read fully inside the error handling, because nibabel reads lazily and a truncated file would otherwise only fail
later, deep inside a transform.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import convert_to_numpy
from monai.utils.enums import SpaceKeys

from pipeline.common.files import atomic_write_bytes
from pipeline.common.grids import check_liver_hu, check_liver_present, label_on_image_grid
from pipeline.common.volume import Volume
from pipeline.common.volume_checks import (
    NIFTI2_HEADER_SIZE,
    PARSE_ERRORS,
    check_affine,
    check_hounsfield,
    check_pixdim,
    check_voxel_budget,
    checked_shape,
    count_non_finite,
    first_line,
    max_voxels,
    min_max,
    sniff_header,
)
from transforms.errors import InputDataError

__all__ = ["read_ct", "read_label", "load_case", "save_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LABEL_DTYPES = (np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.int32))
# nibabel's own default: level 1 writes a 512x512x100 volume in well under a second at a few % larger files.
GZIP_LEVEL = 1

_GZIP_MAGIC = b"\x1f\x8b"


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
        check_affine(path, affine)
    elif series_uid is not None:
        raise InputDataError(path, f"a series UID ({series_uid}) was given, but the CT is a NIfTI file, not a DICOM "
                                   "series folder.", "drop the series UID, or pass the series' folder.")
    else:
        path, array, affine = _read_nifti(path)
    low, high = min_max(array)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InputDataError(path, f"contains {count_non_finite(array)}; a CT needs a finite HU value in every "
                                   "voxel.",
                             "re-export the scan; if NaN/Inf marks outside the field of view, fill it with -1024.")
    if check_hu:
        check_hounsfield(path, array, low, high)
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
    low, high = min_max(array)
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
            nearest-neighbour onto the CT's, :func:`pipeline.common.grids.label_on_image_grid`).
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


def _read_nifti(path: str | os.PathLike) -> tuple[Path, np.ndarray, np.ndarray]:
    """Read ``path`` into ``(path, array (X, Y, Z) as stored with scaling applied, affine)`` with all file and
    geometry checks. The header is parsed and checked (shape, voxel count against
    :func:`~pipeline.common.volume_checks.max_voxels`, spacing) before the voxel data are decompressed."""
    path = Path(path)
    raw = _read_bytes(path)
    _, header, stored_shape = sniff_header(path, _decompress(path, raw, limit=NIFTI2_HEADER_SIZE), header_only=True)
    shape = checked_shape(path, stored_shape)
    check_pixdim(path, header)
    check_voxel_budget(path, shape, header)
    data = _decompress(path, raw)
    image_class, header, stored_shape = sniff_header(path, data)
    try:
        image = image_class.from_bytes(data)
        affine = np.asarray(image.affine, dtype=np.float64)
        array = np.asanyarray(image.dataobj)  # forces the lazy proxy to read everything now, inside the handler
    except PARSE_ERRORS as exc:
        raise InputDataError(path, f"corrupt or truncated NIfTI ({type(exc).__name__}: {first_line(exc)}).",
                             "re-export or re-download the file.") from exc
    if array.dtype.kind not in "biuf":
        raise InputDataError(path, f"voxel type {array.dtype} is not a scalar number type (RGB or complex data).",
                             "export a single-channel grey-value / label image.")
    check_affine(path, affine)
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
        raise InputDataError(path, f"truncated or corrupt gzip data ({first_line(exc)}).",
                             "re-download or re-export the file; an interrupted copy is the usual cause.") from exc


# ----------------------------------------------------------------------------------------------------------- helpers


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

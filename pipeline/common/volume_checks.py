"""Checks of one volume's header, geometry and values, and the resource limits they enforce.

:mod:`pipeline.common.io` runs them while reading: the NIfTI header is identified and parsed without nibabel's silent
fixes (:func:`sniff_header`), its shape, declared voxel count and spacing are checked before any voxel data are
decompressed, the voxel-to-world affine (NIfTI or DICOM) must be finite, non-singular, of plausible spacing and
axis-aligned, and a CT's values must be plausible Hounsfield units. Each problem is an
:class:`transforms.errors.InputDataError` naming the file, the problem and a fix.

The voxel-count and spacing limits can be changed through environment variables (:func:`max_voxels`,
:func:`spacing_range_mm`), for the CLI, the bundle and the MONAI Label server alike.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from transforms.errors import InputDataError

__all__ = [
    "MAX_VOXELS_ENV",
    "SPACING_RANGE_ENV",
    "NIFTI1_HEADER_SIZE",
    "NIFTI2_HEADER_SIZE",
    "PARSE_ERRORS",
    "max_voxels",
    "spacing_range_mm",
    "sniff_header",
    "checked_shape",
    "check_voxel_budget",
    "check_pixdim",
    "check_affine",
    "min_max",
    "check_hounsfield",
    "count_non_finite",
    "first_line",
]

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
# Resource and plausibility limits, each overridable by an environment variable (for the CLI, the bundle and the
# MONAI Label server alike): the voxel count a header may declare before anything is decompressed (a 261 KB .nii.gz
# can unpack to 512^3; 600 M voxels is a 512 x 512 x 2290 whole-body CT), and the voxel spacing in mm (below 0.1 mm
# or above 20 mm is a header error such as spacing stored in metres, and would make the liver ROI allocate
# gigabytes or count every voxel as a lesion of min_lesion_mm3).
MAX_VOXELS_ENV, MAX_VOXELS_DEFAULT = "HEPAFAIR_MAX_VOXELS", 600_000_000
SPACING_RANGE_ENV, SPACING_RANGE_DEFAULT_MM = "HEPAFAIR_SPACING_RANGE_MM", (0.1, 20.0)

NIFTI1_HEADER_SIZE = 348
NIFTI2_HEADER_SIZE = 540
_KNOWN_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89HDF", "an HDF5 file"),
    (b"\x93NUMPY", "a NumPy .npy file"),
    (b"PK\x03\x04", "a ZIP archive (e.g. .npz)"),
    (b"NRRD", "an NRRD file"),
)
# Everything nibabel, numpy or the stdlib raise for a damaged or hostile file while parsing it from memory.
PARSE_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, MemoryError, ImageFileError, HeaderDataError,
                WrapStructError)


# ------------------------------------------------------------------------------------------------------------ limits


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


# ------------------------------------------------------------------------------------------------------------ header


def sniff_header(path: Path, data: bytes, header_only: bool = False
                 ) -> tuple[type[nib.Nifti1Image], nib.Nifti1Header, tuple[int, ...]]:
    """Identify NIfTI-1/-2 from the header size or magic and parse the header (and the stored shape) without
    nibabel's silent fixes, so that e.g. a negative pixdim is seen as written. ``header_only``: ``data`` is just the
    start of the file; the header extensions after it are not read."""
    if not data:
        raise InputDataError(path, "not a NIfTI file: the file is empty.", "re-export or re-download the file.")
    if len(data) < NIFTI1_HEADER_SIZE:
        raise InputDataError(path, f"not a NIfTI file: {_describe_content(data)}; {len(data)} bytes is shorter than "
                                   "a NIfTI header.",
                             "convert the image to NIfTI (.nii.gz), or re-download it if the copy was cut short.")
    sizes = {int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")}
    if NIFTI2_HEADER_SIZE in sizes or data[4:8] == b"n+2\x00":
        image_class, header_class = nib.Nifti2Image, nib.Nifti2Header
    elif NIFTI1_HEADER_SIZE in sizes or data[344:348] in (b"n+1\x00", b"ni1\x00"):
        image_class, header_class = nib.Nifti1Image, nib.Nifti1Header
    else:
        raise InputDataError(path, f"not a NIfTI file: {_describe_content(data)}.",
                             "convert the image to NIfTI (.nii.gz), e.g. with SimpleITK.WriteImage.")
    if header_only:
        data = data[: NIFTI2_HEADER_SIZE if header_class is nib.Nifti2Header else NIFTI1_HEADER_SIZE]
    try:
        header = header_class.from_fileobj(io.BytesIO(data), check=False)
        magic = bytes(header["magic"])
        shape = tuple(int(n) for n in header.get_data_shape())
    except PARSE_ERRORS as exc:
        raise InputDataError(path, f"corrupt NIfTI header ({first_line(exc)}).",
                             "re-export or re-download the file.") from exc
    if magic.startswith(b"ni"):
        raise InputDataError(path, "header of a two-file NIfTI (.hdr/.img pair), the voxel data are elsewhere.",
                             "convert the pair to a single .nii.gz, e.g. with nibabel or SimpleITK.")
    return image_class, header, shape


def _describe_content(data: bytes) -> str:
    for signature, name in _KNOWN_SIGNATURES:
        if data.startswith(signature):
            return f"the content is {name}"
    if data[128:132] == b"DICM":
        return "the content is a DICOM file"
    head = data[:NIFTI1_HEADER_SIZE]
    if head and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        return f"the content is text, starting {head[:40].decode('ascii')!r}"
    return "no NIfTI header size (348/540) or magic ('n+1'/'n+2') found"


def checked_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
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


def check_voxel_budget(path: Path, shape: tuple[int, int, int], header: nib.Nifti1Header) -> None:
    """Refuse a header that declares more voxels than :func:`max_voxels`, before the data are decompressed."""
    n_voxels, limit = int(np.prod(shape, dtype=np.int64)), max_voxels()
    if n_voxels > limit:
        itemsize = np.dtype(header.get_data_dtype()).itemsize
        raise InputDataError(path, f"the header declares {shape[0]} x {shape[1]} x {shape[2]} = {n_voxels:,} voxels "
                                   f"({n_voxels * itemsize / 2**30:.1f} GiB once decompressed), above the limit of "
                                   f"{limit:,} voxels.",
                             f"if this is a real scan, raise the limit: {MAX_VOXELS_ENV}={n_voxels} (environment).")


def check_pixdim(path: Path, header: nib.Nifti1Header) -> None:
    """Refuse a header whose voxel spacing (pixdim) is zero, negative or not finite."""
    spacing = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    finite = np.isfinite(spacing)
    problems = [name for name, bad in (("NaN/Inf", ~finite), ("zero", spacing == 0), ("negative", spacing < 0))
                if np.any(bad)]
    if problems:
        shown = [round(float(v), 6) for v in spacing]
        raise InputDataError(path, f"{' and '.join(problems)} voxel spacing {shown} mm in the header (pixdim); "
                                   "spacing must be positive and finite.",
                             "re-export the scan, or set the spacing, e.g. with nibabel header.set_zooms.")


# ---------------------------------------------------------------------------------------------------------- geometry


def check_affine(path: Path, affine: np.ndarray) -> None:
    """Refuse non-finite, singular and oblique voxel-to-world matrices (see :func:`pipeline.common.io.read_ct`)."""
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


# ------------------------------------------------------------------------------------------------------------ values


def min_max(array: np.ndarray) -> tuple[float, float]:
    """Min and max as floats; NaN anywhere makes both NaN, +/-Inf shows up in them, so no separate isfinite pass."""
    return float(np.min(array)), float(np.max(array))


def check_hounsfield(path: Path, array: np.ndarray, low: float, high: float) -> None:
    """Refuse CT values that are not plausible Hounsfield units (see :func:`pipeline.common.io.read_ct`); ``low``
    and ``high`` are the array's :func:`min_max`."""
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


def count_non_finite(array: np.ndarray) -> str:
    """The NaN and Inf voxels of ``array`` in words (``"3 NaN voxels and 1 Inf voxel"``), for an error message."""
    nan = int(np.count_nonzero(np.isnan(array)))
    inf = int(np.count_nonzero(np.isinf(array)))
    counts = ((nan, "NaN"), (inf, "Inf"))
    return " and ".join(f"{count} {name} voxel{'s' if count > 1 else ''}" for count, name in counts if count)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

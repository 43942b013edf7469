"""DICOM CT series in: a folder of one series read into the same ``(X, Y, Z)`` array + RAS affine a NIfTI gives.

:func:`pipeline.common.io.read_ct` calls :func:`read_series` for a folder; everything after it (HU plausibility, the
liver
checks, inference, outputs) is the NIfTI path unchanged, and outputs stay NIfTI on the reconstructed grid.

The series is read with SimpleITK's series reader: GDCM sorts the files by their position along the slice normal
and applies each file's RescaleSlope/RescaleIntercept (stored values -> HU; read as float32 so a non-integer slope is
not truncated). Before any pixel is decoded, the headers of every file are checked, because the reader itself only
warns about the problems that would silently distort the volume: mixed image sizes or orientations, a gantry tilt
(slices shifted in-plane: the grid is sheared, not a box), missing or unevenly spaced slices (the grid would assume
one spacing), two slices at one position, and a modality other than CT.
"""

from __future__ import annotations

import locale
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from transforms.errors import InputDataError

__all__ = ["SeriesInfo", "list_series", "read_series"]

# DICOM tags as SimpleITK names them (group|element, lower-case hex)
MODALITY, SERIES_DESCRIPTION = "0008|0060", "0008|103e"
GANTRY_TILT, IMAGE_POSITION, IMAGE_ORIENTATION = "0018|1120", "0020|0032", "0020|0037"
ROWS, COLUMNS = "0028|0010", "0028|0011"
# Slice positions along the normal may differ from the typical step by this fraction (plus 0.01 mm) before the
# spacing counts as uneven: scanners write positions rounded to 0.01-0.1 mm.
SPACING_RTOL, SPACING_ATOL_MM = 0.02, 0.01
# In-plane shift between consecutive slices, as an angle from the normal, above which the series is tilted.
MAX_TILT_DEG = 0.5
SERIES_UID_FIX = "choose one with --series-uid UID (infer) or \"series_uid\": \"UID\" in the datalist entry."


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in a folder: its UID, files (sorted by position along the slice normal) and the
    header fields that tell series apart."""

    uid: str
    files: tuple[str, ...]
    modality: str
    description: str

    def describe(self) -> str:
        text = f"{self.uid} ({len(self.files)} file{'s' if len(self.files) != 1 else ''}, {self.modality or '?'}"
        return text + (f", '{self.description}')" if self.description else ")")


@contextmanager
def _itk_warnings_muted() -> Iterator[None]:
    """ITK prints warnings (no series found, non-uniform sampling) to stderr; the checks here report those
    problems as errors naming the folder instead. GDCM may also switch the whole process to the "C" locale (its
    writer does), after which Python decodes text files as ASCII: the locale is restored on the way out."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    saved_locale = locale.setlocale(locale.LC_ALL, None)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
        locale.setlocale(locale.LC_ALL, saved_locale)


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """Every DICOM series directly in ``folder`` (not in sub-folders), in the order GDCM finds them.

    Raises:
        InputDataError: the folder holds no DICOM series.
    """
    folder = Path(folder)
    try:
        with _itk_warnings_muted():
            uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise InputDataError(folder, f"cannot scan the folder for DICOM files ({_first_line(exc)}).") from exc
    if not uids:
        n_files = sum(1 for p in folder.iterdir() if p.is_file())
        raise InputDataError(folder, f"the CT is a folder, but it holds no DICOM series ({n_files} files directly "
                                     "in it; sub-folders are not searched).",
                             "pass the folder that holds the series' .dcm files, or a NIfTI file.")
    series = []
    for uid in uids:
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        header = _header(folder, files[0])
        series.append(SeriesInfo(uid, files, _tag(header, MODALITY), _tag(header, SERIES_DESCRIPTION)))
    return series


def read_series(folder: str | os.PathLike, series_uid: str | None = None, *, max_voxels: int | None = None
                ) -> tuple[Path, np.ndarray, np.ndarray, str]:
    """Read one CT series from ``folder``.

    Args:
        folder: a folder holding the series' files (other series may be there too; see ``series_uid``).
        series_uid: the SeriesInstanceUID to read; needed when the folder holds several series.
        max_voxels: refuse (before decoding pixels) a series with more voxels than this.

    Returns:
        ``(folder, array, affine, uid)``: ``array`` ``(X, Y, Z)`` float32 HU (rescale slope/intercept applied), X the
        DICOM column index, Y the row index, Z the slice order along the normal, in Fortran order like a NIfTI's
        data; ``affine`` ``(4, 4)`` float64 voxel-to-world in RAS mm (DICOM's LPS with x and y negated).

    Raises:
        InputDataError: naming the folder: no series, several series without ``series_uid``, an unknown UID, a
            non-CT modality, mixed sizes or orientations, gantry tilt, duplicate / missing / unevenly spaced slices,
            too many voxels, or pixel data that cannot be decoded.
    """
    folder = Path(folder)
    series = _choose(folder, list_series(folder), series_uid)
    headers = [_header(folder, f) for f in series.files]
    _check_modality(folder, series)
    rows, columns = _check_sizes(folder, series, headers)
    if max_voxels is not None and rows * columns * len(headers) > max_voxels:
        raise InputDataError(folder, f"the series declares {columns} x {rows} x {len(headers)} = "
                                     f"{rows * columns * len(headers):,} voxels, above the limit of {max_voxels:,}.",
                             "if this is a real scan, raise the limit: HEPAFAIR_MAX_VOXELS=N (environment).")
    files = _sorted_and_checked(folder, series, headers)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat32)  # every file's slope/intercept applied in float, none truncated
    try:
        with _itk_warnings_muted():
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputDataError(folder, f"cannot decode the pixel data of series {series.uid} ({_first_line(exc)}); "
                                     "a compressed transfer syntax this SimpleITK build cannot read, or a damaged "
                                     "file.",
                             "decompress the series first (e.g. `gdcmconv --raw` or `dcmdjpeg`), or convert it to "
                             "NIfTI with dcm2niix.") from exc
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # (Z, Y, X) C-order -> (X, Y, Z) Fortran-order
    return folder, np.array(array, dtype=np.float32, order="F"), _ras_affine(image), series.uid


def _choose(folder: Path, series: list[SeriesInfo], series_uid: str | None) -> SeriesInfo:
    by_uid = {s.uid: s for s in series}
    if series_uid is not None:
        if series_uid not in by_uid:
            raise InputDataError(folder, f"no series with UID {series_uid!r}; the folder holds "
                                         f"{'; '.join(s.describe() for s in series)}.", SERIES_UID_FIX)
        return by_uid[series_uid]
    if len(series) > 1:
        raise InputDataError(folder, f"the folder holds {len(series)} DICOM series: "
                                     f"{'; '.join(s.describe() for s in series)}.", SERIES_UID_FIX)
    return series[0]


def _check_modality(folder: Path, series: SeriesInfo) -> None:
    if series.modality.upper() not in ("CT", ""):
        raise InputDataError(folder, f"series {series.uid} has modality {series.modality!r}, not CT; the detector "
                                     "was trained on CT in Hounsfield units.", "pass a CT series.")


def _check_sizes(folder: Path, series: SeriesInfo, headers: list[sitk.ImageFileReader]) -> tuple[int, int]:
    if len(headers) < 2:
        raise InputDataError(folder, f"series {series.uid} has a single slice; a CT volume needs many.",
                             "pass the folder with the whole series (or a multi-frame file converted to NIfTI).")
    sizes = {(int(_tag(h, ROWS) or 0), int(_tag(h, COLUMNS) or 0)) for h in headers}
    if len(sizes) > 1:
        raise InputDataError(folder, f"series {series.uid} mixes image sizes (rows x columns): "
                                     f"{', '.join(f'{r}x{c}' for r, c in sorted(sizes))}.",
                             "export the series again, or separate the images (a localiser mixed in?).")
    (rows, columns), = sizes
    return rows, columns


def _sorted_and_checked(folder: Path, series: SeriesInfo, headers: list[sitk.ImageFileReader]) -> list[str]:
    """The series' files sorted by position along the slice normal, after checking: same orientation in every file,
    no gantry tilt, distinct and evenly spaced positions. (GDCM's own sort falls back to file names when positions
    repeat, so the order is computed here.)"""
    tilt = _tag(headers[0], GANTRY_TILT)
    if tilt and abs(_float(folder, tilt, GANTRY_TILT)) > 1e-3:
        raise InputDataError(folder, f"series {series.uid} was acquired with a gantry tilt of {tilt.strip()} degrees: "
                                     "its slices are sheared, not a box-shaped grid.",
                             "resample it onto an axis-aligned grid (e.g. dcm2niix corrects tilt), then pass NIfTI.")
    orientations = np.array([_numbers(folder, h, IMAGE_ORIENTATION, 6) for h in headers])
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise InputDataError(folder, f"series {series.uid} mixes slice orientations (ImageOrientationPatient).",
                             "separate the series (a localiser or reformat mixed in?).")
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    positions = np.array([_numbers(folder, h, IMAGE_POSITION, 3) for h in headers])
    order = np.argsort(positions @ normal, kind="stable")
    files = [series.files[i] for i in order]
    steps = np.diff(positions[order], axis=0)
    along = steps @ normal
    if np.any(np.abs(along) < SPACING_ATOL_MM):
        k = int(np.argmin(np.abs(along)))
        raise InputDataError(folder, f"series {series.uid} has two slices at one position ({Path(files[k]).name} and "
                                     f"{Path(files[k + 1]).name}): several acquisitions or phases in one "
                                     "series.", "separate the acquisitions (e.g. by AcquisitionNumber) into folders.")
    sideways = np.linalg.norm(steps - along[:, None] * normal, axis=1)
    degrees = float(np.degrees(np.arctan2(sideways, np.abs(along))).max())
    if degrees > MAX_TILT_DEG:
        raise InputDataError(folder, f"series {series.uid}: consecutive slices are shifted in-plane by up to "
                                     f"{sideways.max():.2f} mm ({degrees:.1f} degrees from the slice normal), a gantry "
                                     "tilt: the slices form a sheared grid.",
                             "resample it onto an axis-aligned grid (e.g. dcm2niix corrects tilt), then pass NIfTI.")
    spacing = np.abs(along)
    typical = float(np.median(spacing))
    uneven = np.abs(spacing - typical) > SPACING_RTOL * typical + SPACING_ATOL_MM
    if np.any(uneven):
        k = int(np.argmax(uneven))
        strays = _files_outside_series(folder)
        stray_hint = (f"; {len(strays)} file(s) in the folder are in no readable series ({', '.join(strays[:3])}"
                      f"{', ...' if len(strays) > 3 else ''}): damaged copies?" if strays else "")
        raise InputDataError(folder, f"series {series.uid} has unevenly spaced or missing slices: {spacing[k]:.3g} mm "
                                     f"between {Path(files[k]).name} and {Path(files[k + 1]).name} "
                                     f"where {typical:.3g} mm is typical ({int(uneven.sum())} such gap(s))"
                                     f"{stray_hint}.",
                             "export the complete series; resample an uneven one onto a regular grid first.")
    return files


def _files_outside_series(folder: Path) -> list[str]:
    """Names of the files directly in ``folder`` that belong to no series GDCM can read."""
    with _itk_warnings_muted():
        listed = {Path(f).name for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
                  for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)}
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in listed)


def _ras_affine(image: sitk.Image) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS mm from SimpleITK's LPS origin, spacing and direction."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _header(folder: Path, file: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputDataError(folder, f"cannot read the DICOM header of {Path(file).name} ({_first_line(exc)}).",
                             "re-export the series; an interrupted copy is the usual cause.") from exc
    return reader


def _tag(header: sitk.ImageFileReader, key: str) -> str:
    return header.GetMetaData(key).strip() if header.HasMetaDataKey(key) else ""


def _float(folder: Path, text: str, key: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise InputDataError(folder, f"DICOM tag {key} holds {text!r}, not a number.") from exc


def _numbers(folder: Path, header: sitk.ImageFileReader, key: str, n: int) -> list[float]:
    text = _tag(header, key)
    values = [_float(folder, v, key) for v in text.split("\\") if v.strip()]
    if len(values) != n:
        name = {IMAGE_POSITION: "ImagePositionPatient", IMAGE_ORIENTATION: "ImageOrientationPatient"}[key]
        raise InputDataError(folder, f"{Path(header.GetFileName()).name}: {name} ({key}) holds {text!r}, not {n} "
                                     "numbers; the slice geometry is unknown.", "re-export the series.")
    return values


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # ITK puts the file and line of its own source first; the last line says what went wrong
    return lines[-1] if lines else type(exc).__name__

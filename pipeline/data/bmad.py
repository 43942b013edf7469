"""The BMAD liver benchmark folder: its layout, its PNG reading/writing, and the export of a prepared folder to it.

The import side (a BMAD liver folder -> a prepared folder) is :mod:`pipeline.data.bmad_import`.

BMAD layout (``train`` holds normal slices only; ``Ungood`` slices have a lesion mask of the same file name)::

    train/good/img/<volume>_<slice>.png
    {valid,test}/{good,Ungood}/img/<volume>_<slice>.png
    {valid,test}/Ungood/anomaly_mask/<volume>_<slice>.png

Images are 8-bit gray PNGs with the liver on a black background, so the liver mask is ``pixel > 0``; masks are 0/255.

Orientation: prepared slices are (X, Y) arrays in RAS (X grows toward the patient's right, Y toward anterior). A PNG
is shown in radiological convention (anterior up, the patient's right on the image's left), so::

    png[row, col] = slice[S - 1 - col, S - 1 - row]      i.e.  png = slice[::-1, ::-1].T

This mapping is its own inverse (:func:`pipeline.common.display.ras_to_display`,
:func:`pipeline.common.display.display_to_ras`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.common.display import ras_to_display
from pipeline.common.files import atomic_write, ensure_output_dir
from pipeline.data.manifest import SPLITS, load_manifest
from transforms.errors import InputDataError

__all__ = ["BMAD_SPLITS", "GOOD", "UNGOOD", "read_png", "export_bmad", "main_export"]

# our split name -> BMAD folder name
BMAD_SPLITS = {"training": "train", "validation": "valid", "test": "test"}
GOOD, UNGOOD = "good", "Ungood"


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read an 8-bit PNG as a 2D gray array.

    In: a gray, gray+alpha, RGB or RGBA 8-bit PNG (color images are averaged over R, G, B; alpha is ignored).
    Out: ``(rows, cols)`` uint8 array in [0, 255].

    Raises:
        InputDataError: the file cannot be read as an image, is not 2D, or is not 8-bit.
    """
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputDataError(path, f"cannot read the PNG ({first}).", "re-export the slice as an 8-bit gray PNG.") \
            from exc
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() != 2:
        raise InputDataError(path, f"expected a 2D image, got {image.GetDimension()}D of shape {array.shape}.")
    if array.dtype != np.uint8:
        raise InputDataError(path, f"expected an 8-bit PNG, got pixel type {array.dtype}.",
                             "re-export the slice as an 8-bit gray PNG (0-255).")
    if array.ndim == 3:
        # gray stored as RGB has equal channels, so the mean gives it back exactly
        array = np.rint(array[..., : min(3, array.shape[-1])].mean(axis=-1)).astype(np.uint8)
    return array


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write a 2D uint8 array as a gray PNG, atomically (SimpleITK picks the PNG writer from the temp name's suffix)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    atomic_write(path, lambda temp: sitk.WriteImage(image, str(temp)))


def _export_folders() -> list[str]:
    """Every leaf folder an export writes, in BMAD's class-first layout."""
    folders = [f"{BMAD_SPLITS['training']}/{GOOD}/img"]
    for name in ("validation", "test"):
        split = BMAD_SPLITS[name]
        folders += [f"{split}/{GOOD}/img", f"{split}/{UNGOOD}/img", f"{split}/{UNGOOD}/anomaly_mask"]
    return folders


def _load_slice(path: str, dtype: type) -> np.ndarray:
    """A prepared ``(1, S, S)`` .npy slice as its ``(S, S)`` plane."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputDataError(path, f"cannot read the prepared slice ({exc}).", "re-run `python -m pipeline prepare`.") \
            from exc
    if array.ndim != 3 or array.shape[0] != 1:
        raise InputDataError(path, f"expected a (1, S, S) slice, got shape {array.shape}.",
                             "re-run `python -m pipeline prepare`.")
    return array[0].astype(dtype, copy=False)


def export_bmad(prepared_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> dict:
    """Write a prepared folder's slices as a BMAD liver benchmark folder.

    ``training`` slices go to ``train/good/img``; ``validation``/``test`` slices to ``valid``/``test`` ``good/img`` or,
    when the entry's ``has_lesion`` is set, ``Ungood/img`` plus ``Ungood/anomaly_mask``. Files are named
    ``<case_id>_<slice_index>.png``.

    Pixels: image ``(1, S, S)`` float32 in [0, 1] -> ``(S, S)`` uint8 ``round(255 * image)`` inside the liver and 0
    outside it (BMAD's liver on black); liver pixels that would round to 0 are written as 1, because the format
    encodes the liver as ``pixel > 0``. Mask: ``255`` where the label is 2 (lesion), else 0. Both are mapped to
    radiological display with :func:`ras_to_display`.

    Args:
        prepared_dir: a folder written by ``prepare`` (or its ``manifest.json``).
        out_dir: the BMAD folder to write (created when missing).
        overwrite: replace an earlier export in ``out_dir``; its stale PNGs are removed (nothing else is touched).

    Returns:
        ``{folder relative to out_dir: number of PNGs written}`` for every folder of the layout (0 when empty).

    Raises:
        InputDataError: unreadable manifest or slice, a training slice with a lesion, or ``out_dir`` already holds an
            export and ``overwrite`` is off.
    """
    manifest = load_manifest(prepared_dir)
    out = ensure_output_dir(out_dir)
    folders = _export_folders()
    existing = [p for folder in folders if (out / folder).is_dir() for p in (out / folder).glob("*.png")]
    if existing and not overwrite:
        raise InputDataError(out, f"already holds a BMAD export ({len(existing)} PNG files).",
                             "pass --overwrite to replace it, or choose another --out.")
    for path in existing:
        path.unlink()
    for folder in folders:
        ensure_output_dir(out / folder)

    counts = dict.fromkeys(folders, 0)
    for name in SPLITS:
        split = BMAD_SPLITS[name]
        for entry in manifest.get(name, []):
            image = _load_slice(entry["image"], np.float32)
            label = _load_slice(entry["label"], np.uint8)
            liver = label > 0
            pixels = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
            pixels = np.where(liver, np.maximum(pixels, 1), 0).astype(np.uint8)
            if name == "training" and entry["has_lesion"]:
                raise InputDataError(entry["label"], "a training slice has a lesion; BMAD's train split holds normal "
                                     "slices only.", "re-run `python -m pipeline prepare`.")
            file_name = f"{entry['case_id']}_{entry['slice_index']}.png"
            cls = UNGOOD if entry["has_lesion"] else GOOD
            _write_png(out / split / cls / "img" / file_name, ras_to_display(pixels))
            counts[f"{split}/{cls}/img"] += 1
            if cls == UNGOOD:
                mask = np.where(label == 2, 255, 0).astype(np.uint8)
                _write_png(out / split / cls / "anomaly_mask" / file_name, ras_to_display(mask))
                counts[f"{split}/{cls}/anomaly_mask"] += 1
    return counts


def main_export(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline export-bmad PREPARED_DIR --out DIR [--overwrite]``; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline export-bmad",
        description="Write a prepared folder as a BMAD liver benchmark folder (8-bit PNGs, radiological display).",
    )
    p.add_argument("prepared_dir", metavar="PREPARED_DIR", help="folder written by `python -m pipeline prepare`")
    p.add_argument("--out", required=True, metavar="DIR", help="BMAD folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    args = p.parse_args(argv)
    try:
        counts = export_bmad(args.prepared_dir, args.out, overwrite=args.overwrite)
    except InputDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for folder, n in counts.items():
        print(f"{n:6d}  {folder}")
    print(f"{sum(n for f, n in counts.items() if f.endswith('/img')):6d}  slices in {args.out}")
    return 0

"""Export a prepared folder as a BMAD liver benchmark folder, and import a BMAD liver folder as a prepared folder.

BMAD layout (``train`` holds normal slices only; ``Ungood`` slices have a lesion mask of the same file name)::

    train/good/img/<volume>_<slice>.png
    {valid,test}/{good,Ungood}/img/<volume>_<slice>.png
    {valid,test}/Ungood/anomaly_mask/<volume>_<slice>.png

Import also accepts ``label/`` in place of ``anomaly_mask/`` and the ``{valid,test}/{img,label}/{good,Ungood}``
(``train/img/good``) variant. Images are 8-bit gray PNGs with the liver on a black background, so the liver mask is
``pixel > 0``; masks are 0/255.

Orientation: prepared slices are (X, Y) arrays in RAS (X grows toward the patient's right, Y toward anterior). A PNG
is shown in radiological convention (anterior up, the patient's right on the image's left), so::

    png[row, col] = slice[S - 1 - col, S - 1 - row]      i.e.  png = slice[::-1, ::-1].T

This mapping is its own inverse (:func:`ras_to_display`, :func:`display_to_ras`). BMAD's own liver PNGs come from
``matplotlib.imsave`` of nibabel arrays followed by a vertical flip, so their orientation depends on the source file's
header; imported slices are treated as radiological display, which is what BMAD's figures show.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from monai.transforms import Resize
from monai.utils import convert_to_numpy

from pipeline.io import atomic_write, atomic_write_json, ensure_output_dir
from pipeline.prepare import MANIFEST_FORMAT, SPLITS, load_manifest, summarize, write_case
from transforms.errors import InputDataError

__all__ = [
    "BMAD_SPLITS",
    "ras_to_display",
    "display_to_ras",
    "read_png",
    "export_bmad",
    "import_bmad",
    "main_export",
    "main_import",
]

# our split name -> BMAD folder name
BMAD_SPLITS = {"training": "train", "validation": "valid", "test": "test"}
GOOD, UNGOOD = "good", "Ungood"
# Image folders of one (split, class), then mask folders of a split's Ungood class, in the order they are looked for.
_IMAGE_DIRS = ("{split}/{cls}/img", "{split}/img/{cls}")
_MASK_DIRS = ("{split}/Ungood/anomaly_mask", "{split}/Ungood/label", "{split}/label/Ungood",
              "{split}/anomaly_mask/Ungood")
_EXPECTED = (
    "train/good/img/*.png, {valid,test}/{good,Ungood}/img/*.png and {valid,test}/Ungood/anomaly_mask/*.png "
    "(or Ungood/label/ instead of Ungood/anomaly_mask/, or {valid,test}/{img,label}/{good,Ungood}/*.png)"
)


def ras_to_display(array: np.ndarray) -> np.ndarray:
    """Map a slice from the prepared RAS layout to radiological display (anterior up, patient's right on the left).

    In: ``(..., X, Y)`` array, X toward the patient's right, Y toward anterior. Out: ``(..., Y, X)`` array, same dtype
    and values, ``out[..., r, c] = in[..., X - 1 - c, Y - 1 - r]``. The mapping is its own inverse.
    """
    return np.ascontiguousarray(np.swapaxes(np.asarray(array)[..., ::-1, ::-1], -1, -2))


def display_to_ras(array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ras_to_display` (the same anti-transpose): ``(..., rows, cols)`` -> ``(..., X, Y)`` RAS."""
    return ras_to_display(array)


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


@dataclass(frozen=True)
class _BmadFile:
    """One image PNG of a BMAD folder and where it belongs."""

    split: str  # our split name
    volume: str
    slice_index: int
    image: Path
    mask: Path | None  # set for Ungood slices


def _first_dir(root: Path, patterns: Sequence[str], split: str, cls: str) -> Path | None:
    """The first of ``patterns`` (filled with ``split`` and ``cls``) that is a folder under ``root``."""
    for pattern in patterns:
        folder = root / pattern.format(split=split, cls=cls)
        if folder.is_dir():
            return folder
    return None


def _volume_and_slice(stem: str) -> tuple[str, int | None]:
    """``"<volume>_<slice>"`` -> (volume, slice); other names are a pseudo-volume of their own (slice None)."""
    volume, sep, index = stem.rpartition("_")
    if sep and volume and index.isdigit():
        return volume, int(index)
    return stem, None


def _find_files(root: Path) -> list[_BmadFile]:
    """Every image PNG of a BMAD folder, with its split, volume id, slice index and mask file."""
    present = [name for name, split in BMAD_SPLITS.items() if (root / split).is_dir()]
    if not present:
        raise InputDataError(root, "not a BMAD liver folder: none of train/, valid/, test/ exists.",
                             f"expected {_EXPECTED}.")
    files = []
    for name in present:
        split = BMAD_SPLITS[name]
        classes = (GOOD,) if name == "training" else (GOOD, UNGOOD)
        image_dirs = {cls: _first_dir(root, _IMAGE_DIRS, split, cls) for cls in classes}
        if all(d is None for d in image_dirs.values()):
            expected = ", ".join(p.format(split=split, cls=c) for c in classes for p in _IMAGE_DIRS)
            raise InputDataError(root / split, "holds no BMAD image folder.", f"expected one of: {expected}.")
        mask_dir = _first_dir(root, _MASK_DIRS, split, UNGOOD) if image_dirs.get(UNGOOD) else None
        for cls, image_dir in image_dirs.items():
            if image_dir is None:
                continue
            # hidden names are temporary files of an interrupted writer (atomic_write's ".tmp-..."), not slices
            pngs = sorted(p for p in image_dir.iterdir()
                          if p.suffix.lower() == ".png" and not p.name.startswith(".") and p.is_file())
            if cls == UNGOOD and pngs and mask_dir is None:
                expected = ", ".join(p.format(split=split) for p in _MASK_DIRS)
                raise InputDataError(root / split, f"has Ungood images ({image_dir}) but no mask folder.",
                                     f"expected one of: {expected}.")
            for png in pngs:
                mask = None
                if cls == UNGOOD:
                    mask = mask_dir / png.name
                    if not mask.is_file():
                        raise InputDataError(png, f"no lesion mask for this Ungood image (looked for {mask}).",
                                             "give every Ungood image a mask PNG of the same name.")
                volume, index = _volume_and_slice(png.stem)
                files.append(_BmadFile(name, volume, 0 if index is None else index, png, mask))
    return files


def _case_ids(files: Sequence[_BmadFile], root: Path) -> tuple[dict[tuple[str, str], str], list[dict]]:
    """(split, volume) -> case id, and one warning per volume id found in several splits.

    A volume in one split keeps its id as case id. BMAD splits by slice, so a volume id can appear in two splits
    (valid and test may share a LiTS volume; train's BTCV ids may coincide with LiTS ids): each split then gets its own
    case ``<volume>-<bmad split>`` so that no case straddles splits, and a warning records it.
    """
    splits_of = defaultdict(set)
    for f in files:
        splits_of[f.volume].add(f.split)
    ids, warnings = {}, []
    for volume in sorted(splits_of):
        names = [n for n in SPLITS if n in splits_of[volume]]
        if len(names) == 1:
            ids[(names[0], volume)] = volume
            continue
        for n in names:
            ids[(n, volume)] = f"{volume}-{BMAD_SPLITS[n]}"
        warnings.append(
            {
                "volume": volume,
                "splits": names,
                "case_ids": [ids[(n, volume)] for n in names],
                "message": f"volume id {volume!r} appears in {', '.join(BMAD_SPLITS[n] for n in names)} of {root}: "
                "BMAD splits by slice, so these splits may share a patient; imported as one case per split.",
            }
        )
    taken = defaultdict(list)
    for key, case_id in ids.items():
        taken[case_id].append(key)
    clashes = {c: keys for c, keys in taken.items() if len(keys) > 1}
    if clashes:
        case_id, keys = next(iter(clashes.items()))
        raise InputDataError(root, f"case id {case_id!r} would be used for {keys}.",
                             "rename the PNGs so that no volume id ends in '-train', '-valid' or '-test'.")
    return ids, warnings


def _import_slice(f: _BmadFile, size: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """One BMAD PNG (+ mask) -> image (1, size, size) float32 [0, 1], label (1, size, size) uint8, native areas."""
    pixels = read_png(f.image)
    liver = pixels > 0
    lesion = np.zeros_like(liver)
    if f.mask is not None:
        mask = read_png(f.mask)
        if mask.shape != pixels.shape:
            raise InputDataError(f.mask, f"mask shape {mask.shape} differs from the shape {pixels.shape} of its image "
                                 f"{f.image}.")
        # 0/255 masks are the format; 0/1 masks (some re-exports) would all fall under the 127 threshold
        lesion = mask > (127 if mask.max() > 1 else 0)
        liver |= lesion  # a lesion is part of the liver, even where the image is black
    image = display_to_ras(pixels.astype(np.float32) / 255.0)[None]
    label = display_to_ras(liver.astype(np.uint8) + lesion.astype(np.uint8))[None]
    if image.shape[1:] != (size, size):
        image = convert_to_numpy(Resize((size, size), mode="bilinear", anti_aliasing=True)(image))
        label = convert_to_numpy(Resize((size, size), mode="nearest-exact")(label.astype(np.float32)))
        label = label.astype(np.uint8)
        image = np.clip(image, 0.0, 1.0) * (label > 0)  # the resampled image must stay 0 outside the liver
    return image.astype(np.float32), label, int(liver.sum()), int(lesion.sum())


def _import_case(case_id: str, files: Sequence[_BmadFile], root: Path, cases_dir: Path, settings: dict) -> dict:
    """Convert one case's PNGs and write its folder atomically with :func:`pipeline.prepare.write_case`; return its
    ``case.json`` content."""

    def slices():
        for f in sorted(files, key=lambda f: f.slice_index):
            image, label, liver_area, lesion_area = _import_slice(f, settings["size"])
            fields = {"slice_index": f.slice_index, "liver_area": liver_area, "lesion_area": lesion_area,
                      "has_lesion": int(f.mask is not None), "source": f.image.relative_to(root).as_posix()}
            yield fields, image, label

    info = {
        "case_id": case_id,
        "source": {"dataset": "bmad", "folder": str(root), "volume": files[0].volume},
        "settings": settings,
        "split": files[0].split,
    }
    return write_case(cases_dir, case_id, slices(), info)


def import_bmad(bmad_dir: str | os.PathLike, out_dir: str | os.PathLike, size: int = 256) -> dict:
    """Read a BMAD liver folder into the prepared format (``cases/`` + ``manifest.json``); return the manifest.

    Each PNG becomes one slice of case ``<volume>`` (the file name before its last ``_``; the part after it is the
    slice index) or, for names without ``_<number>``, a case of its own with slice index 0. Splits: ``train`` ->
    ``"training"``, ``valid`` -> ``"validation"``, ``test`` -> ``"test"``; a volume id found in several splits becomes
    one case per split (``<volume>-<bmad split>``) and is listed under ``"warnings"``.

    Per slice: the PNG is mapped from radiological display to RAS (:func:`display_to_ras`); liver = ``pixel > 0``
    (plus the lesion); lesion = mask ``> 127`` for ``Ungood`` slices (``> 0`` for 0/1 masks); ``has_lesion`` = the
    slice is ``Ungood``. Written: image ``(1, size, size)`` float32 ``pixel / 255`` in [0, 1], 0 outside the liver
    (bilinear with antialiasing when resized); label ``(1, size, size)`` uint8 0/1/2 (nearest when resized; a
    non-square PNG is stretched). ``liver_area``/``lesion_area`` count pixels of the PNG's own grid.

    Args:
        bmad_dir: the BMAD liver folder (see the module docstring for the accepted layouts).
        out_dir: the prepared folder to write (created when missing).
        size: output slice size in pixels.

    Raises:
        InputDataError: missing sub-folders (naming the folder and the expected layout), an unreadable PNG or a
            missing mask (naming the file), or two PNGs for one slice.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}.")
    root = Path(bmad_dir)
    if not root.is_dir():
        raise InputDataError(root, "no such folder.", f"give a BMAD liver folder: {_EXPECTED}.")
    files = _find_files(root)
    ids, warnings = _case_ids(files, root)
    by_case: dict[str, list[_BmadFile]] = defaultdict(list)
    seen: dict[tuple[str, int], Path] = {}
    for f in files:
        case_id = ids[(f.split, f.volume)]
        if (case_id, f.slice_index) in seen:
            raise InputDataError(f.image, f"is slice {f.slice_index} of volume {f.volume!r}, as is "
                                 f"{seen[(case_id, f.slice_index)]}.",
                                 "keep one PNG per slice (a slice is either good or Ungood).")
        seen[(case_id, f.slice_index)] = f.image
        by_case[case_id].append(f)

    out = ensure_output_dir(out_dir)
    cases_dir = ensure_output_dir(out / "cases")
    for stale in cases_dir.glob(".*.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    settings = {"source": "bmad", "size": int(size)}
    manifest = {"format": MANIFEST_FORMAT, "settings": settings, "splits": {n: [] for n in SPLITS}, "cases": [],
                "failures": [], "warnings": warnings, **{n: [] for n in SPLITS}}
    for case_id in sorted(by_case):
        info = _import_case(case_id, by_case[case_id], root, cases_dir, settings)
        name, slices = info["split"], info["slices"]
        manifest[name] += [
            {
                "image": f"cases/{case_id}/s{s['slice_index']:04d}_image.npy",
                "label": f"cases/{case_id}/s{s['slice_index']:04d}_label.npy",
                "case_id": case_id,
                **s,
            }
            for s in slices
        ]
        manifest["splits"][name].append(case_id)
        n_lesion = sum(s["has_lesion"] for s in slices)
        manifest["cases"].append(
            {
                "case_id": case_id,
                "split": name,
                "dataset": "bmad",
                "volume": info["source"]["volume"],
                "has_lesion": n_lesion > 0,
                "liver_slices": len(slices),
                "lesion_slices": n_lesion,
                "slices_in_split": len(slices),
            }
        )
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


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


def main_import(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline import-bmad BMAD_DIR --out DIR [--size 256]``; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline import-bmad",
        description="Read a BMAD liver benchmark folder into a prepared folder (cases/ + manifest.json).",
    )
    p.add_argument("bmad_dir", metavar="BMAD_DIR", help="BMAD liver folder (train/, valid/, test/)")
    p.add_argument("--out", required=True, metavar="DIR", help="prepared folder to write")
    p.add_argument("--size", type=int, default=256, help="slice size in pixels (default: 256)")
    args = p.parse_args(argv)
    if args.size < 1:
        p.error("--size must be positive.")
    try:
        manifest = import_bmad(args.bmad_dir, args.out, size=args.size)
    except InputDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summarize(manifest))
    for w in manifest["warnings"]:
        print(f"warning: {w['message']}", file=sys.stderr)
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0

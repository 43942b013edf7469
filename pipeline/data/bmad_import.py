"""Import a BMAD liver benchmark folder as a prepared folder (``cases/`` + ``manifest.json``).

The layout, PNG reading and the export side are :mod:`pipeline.data.bmad`. Besides that layout (``train/good/img``,
``{valid,test}/{good,Ungood}/img``, ``{valid,test}/Ungood/anomaly_mask``), import also accepts ``label/`` in place of
``anomaly_mask/`` and the ``{valid,test}/{img,label}/{good,Ungood}`` (``train/img/good``) variant.

Orientation: BMAD's own liver PNGs come from ``matplotlib.imsave`` of nibabel arrays followed by a vertical flip, so
their orientation depends on the source file's header; imported slices are treated as radiological display, which is
what BMAD's figures show, and mapped back to RAS with :func:`pipeline.common.display.display_to_ras`.
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
from monai.transforms import Resize
from monai.utils import convert_to_numpy

from pipeline.common.display import display_to_ras
from pipeline.common.files import atomic_write_json, ensure_output_dir
from pipeline.data.bmad import BMAD_SPLITS, GOOD, UNGOOD, read_png
from pipeline.data.manifest import MANIFEST_FORMAT, SPLITS, summarize
from pipeline.data.prepare import write_case
from transforms.errors import InputDataError

__all__ = ["import_bmad", "main_import"]

# Image folders of one (split, class), then mask folders of a split's Ungood class, in the order they are looked for.
_IMAGE_DIRS = ("{split}/{cls}/img", "{split}/img/{cls}")
_MASK_DIRS = ("{split}/Ungood/anomaly_mask", "{split}/Ungood/label", "{split}/label/Ungood",
              "{split}/anomaly_mask/Ungood")
_EXPECTED = (
    "train/good/img/*.png, {valid,test}/{good,Ungood}/img/*.png and {valid,test}/Ungood/anomaly_mask/*.png "
    "(or Ungood/label/ instead of Ungood/anomaly_mask/, or {valid,test}/{img,label}/{good,Ungood}/*.png)"
)


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
    """Convert one case's PNGs and write its folder atomically with :func:`pipeline.data.prepare.write_case`; return its
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
